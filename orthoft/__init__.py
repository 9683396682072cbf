"""orthoft: parameter-efficient orthogonal fine-tuning as PEFT methods.

``import orthoft`` registers every method with PEFT, so ``peft.get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and transformers' ``load_adapter`` /
``AutoModel*.from_pretrained(adapter_dir)`` accept orthoft configs and adapters (without the
import they fail with ``KeyError: 'ORTHOFT_<METHOD>'``).
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
    estimate_fisher,
    merge_adapters,
    regularization_loss,
    write_adapter_card,
)
from .export import export_merged
from .optim import recommended_lr
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
    "recommended_lr",
    "regularization_loss",
    "write_adapter_card",
    "estimate_fisher",
    "merge_adapters",
]
