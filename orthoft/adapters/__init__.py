"""orthoft's PEFT methods; importing this package registers them with PEFT."""

from .base import OrthoLayer, OrthoTuner, layer_kind
from .boft import BOFTConfig, BOFTLayer, BOFTModel
from .clover import CLOVERConfig, CLOVERLayer, CLOVERModel
from .config import CayleyConfig, OrthoConfig
from .hra import HRAConfig, HRALayer, HRAModel
from .oft import OFTConfig, OFTLayer, OFTModel
from .psoft import PSOFTConfig, PSOFTLayer, PSOFTModel
from .qgoft import QGOFTConfig, QGOFTLayer, QGOFTModel
from .registry import REGISTERED, register_method
from .regularization import regularization_loss
from .svft import SVFTConfig, SVFTLayer, SVFTModel

register_method("ORTHOFT_OFT", OFTConfig, OFTModel)
register_method("ORTHOFT_BOFT", BOFTConfig, BOFTModel)
register_method("ORTHOFT_QGOFT", QGOFTConfig, QGOFTModel)
register_method("ORTHOFT_HRA", HRAConfig, HRAModel)
register_method("ORTHOFT_PSOFT", PSOFTConfig, PSOFTModel)
register_method("ORTHOFT_SVFT", SVFTConfig, SVFTModel)
register_method("ORTHOFT_CLOVER", CLOVERConfig, CLOVERModel)

__all__ = [
    "CLOVERConfig",
    "CLOVERLayer",
    "CLOVERModel",
    "PSOFTConfig",
    "PSOFTLayer",
    "PSOFTModel",
    "SVFTConfig",
    "SVFTLayer",
    "SVFTModel",
    "HRAConfig",
    "HRALayer",
    "HRAModel",
    "QGOFTConfig",
    "QGOFTLayer",
    "QGOFTModel",
    "regularization_loss",
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
