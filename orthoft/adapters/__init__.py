"""orthoft's PEFT methods; importing this package registers them with PEFT."""

from .base import OrthoLayer, OrthoTuner, layer_kind
from .boft import BOFTConfig, BOFTLayer, BOFTModel
from .card import write_adapter_card
from .clover import CLOVERConfig, CLOVERLayer, CLOVERModel
from .config import CayleyConfig, OrthoConfig
from .fisher import estimate_fisher
from .hra import HRAConfig, HRALayer, HRAModel
from .merging import COMBINATION_TYPES, merge_adapters
from .oft import OFTConfig, OFTLayer, OFTModel
from .orthogonal_adaptation import OrthogonalAdaptationConfig, OrthogonalAdaptationLayer, OrthogonalAdaptationModel
from .psoft import PSOFTConfig, PSOFTLayer, PSOFTModel
from .qgoft import QGOFTConfig, QGOFTLayer, QGOFTModel
from .registry import REGISTERED, register_method
from .regularization import regularization_loss
from .svft import SVFTConfig, SVFTLayer, SVFTModel

# each config class names its method once (OFTConfig.method == "oft"); the PEFT type ORTHOFT_OFT follows from it
register_method(OFTConfig, OFTModel)
register_method(BOFTConfig, BOFTModel)
register_method(QGOFTConfig, QGOFTModel)
register_method(HRAConfig, HRAModel)
register_method(PSOFTConfig, PSOFTModel)
register_method(SVFTConfig, SVFTModel)
register_method(CLOVERConfig, CLOVERModel)
register_method(OrthogonalAdaptationConfig, OrthogonalAdaptationModel)

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
    "OrthogonalAdaptationConfig",
    "OrthogonalAdaptationLayer",
    "OrthogonalAdaptationModel",
    "regularization_loss",
    "write_adapter_card",
    "COMBINATION_TYPES",
    "estimate_fisher",
    "merge_adapters",
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
