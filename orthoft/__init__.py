"""orthoft: parameter-efficient orthogonal fine-tuning as PEFT methods.

``import orthoft`` registers every method with PEFT, so ``peft.get_peft_model`` and
``PeftModel.from_pretrained`` accept orthoft configs.
"""

from .adapters import (
    BOFTConfig,
    CLOVERConfig,
    HRAConfig,
    OFTConfig,
    OrthoConfig,
    OrthoLayer,
    PSOFTConfig,
    QGOFTConfig,
    SVFTConfig,
    regularization_loss,
)
from .export import export_merged
from .version import __version__

__all__ = [
    "BOFTConfig",
    "CLOVERConfig",
    "HRAConfig",
    "OFTConfig",
    "OrthoConfig",
    "OrthoLayer",
    "PSOFTConfig",
    "QGOFTConfig",
    "SVFTConfig",
    "__version__",
    "export_merged",
    "regularization_loss",
]
