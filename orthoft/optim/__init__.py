"""Orthogonalized optimizers (Muon and variants) that understand adapter tensors.

``build_optimizer(model, name, lr=...)`` routes every trainable tensor by the ``optimizer_views``
its adapter layer declares; see ``docs/optim.md``. This package does not import the adapters.
"""

from .learning_rates import RECOMMENDED_LR, recommended_lr, resolve_lr
from .newton_schulz import (
    KELLER_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    ROOT_COEFFICIENTS,
    max_singular_value_deviation,
    orthogonalize,
)
from .optimizers import ROOT, AuON, HybridAuON, Muon, NorMuon, OrthogonalizedOptimizer, TurboMuon
from .routing import Route, build_optimizer, route_parameters
from .views import VIEW_NAMES, VIEWS, get_view

__all__ = [
    "AuON",
    "HybridAuON",
    "KELLER_COEFFICIENTS",
    "Muon",
    "NorMuon",
    "OrthogonalizedOptimizer",
    "POLAR_EXPRESS_COEFFICIENTS",
    "RECOMMENDED_LR",
    "ROOT",
    "ROOT_COEFFICIENTS",
    "Route",
    "TurboMuon",
    "VIEWS",
    "VIEW_NAMES",
    "build_optimizer",
    "get_view",
    "max_singular_value_deviation",
    "orthogonalize",
    "recommended_lr",
    "resolve_lr",
    "route_parameters",
]
