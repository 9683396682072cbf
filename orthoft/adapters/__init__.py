"""orthoft's PEFT methods; importing this package registers them with PEFT."""

from .base import OrthoLayer, OrthoTuner, layer_kind
from .boft import BOFTConfig, BOFTLayer, BOFTModel
from .config import CayleyConfig, OrthoConfig
from .oft import OFTConfig, OFTLayer, OFTModel
from .registry import REGISTERED, register_method

register_method("ORTHOFT_OFT", OFTConfig, OFTModel)
register_method("ORTHOFT_BOFT", BOFTConfig, BOFTModel)

__all__ = [
    "REGISTERED",
    "BOFTConfig",
    "BOFTLayer",
    "BOFTModel",
    "CayleyConfig",
    "OFTConfig",
    "OFTLayer",
    "OFTModel",
    "OrthoConfig",
    "OrthoLayer",
    "OrthoTuner",
    "layer_kind",
    "register_method",
]
