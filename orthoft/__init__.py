"""orthoft: parameter-efficient orthogonal fine-tuning as PEFT methods.

``import orthoft`` registers every method with PEFT, so ``peft.get_peft_model`` and
``PeftModel.from_pretrained`` accept orthoft configs.
"""

__version__ = "0.1.0"

from .adapters import (  # noqa: E402
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
from .export import export_merged  # noqa: E402

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
