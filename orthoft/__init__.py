"""orthoft: parameter-efficient orthogonal fine-tuning as PEFT methods.

``import orthoft`` registers every method with PEFT, so ``peft.get_peft_model`` and
``PeftModel.from_pretrained`` accept orthoft configs.
"""

__version__ = "0.1.0"

from .adapters import BOFTConfig, OFTConfig, OrthoConfig, OrthoLayer  # noqa: E402

__all__ = ["BOFTConfig", "OFTConfig", "OrthoConfig", "OrthoLayer", "__version__"]
