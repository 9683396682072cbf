"""One call for every adapter's training penalty (qGOFT's quasi-orthogonality, HRA's Gram penalty, ...)."""

from __future__ import annotations

import torch
from torch import nn

from .base import OrthoLayer


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``layer.regularization_loss(name)`` over every orthoft layer and active adapter it holds.

    Each term is already weighted by its adapter config (``reg_lambda``), so the result is meant
    to be added to the task loss as is: ``loss = task_loss + orthoft.regularization_loss(model)``.
    Returns a 0-d float32 tensor on the device of the first term; a 0-d zero tensor (no grad, on
    the model's first parameter's device) when no layer has a penalty. Adapters that are not
    active, layers with adapters disabled, and methods without a penalty contribute nothing.
    """
    terms = []
    for module in model.modules():
        if not isinstance(module, OrthoLayer) or module.disable_adapters:
            continue
        for name in module.active_adapters:
            if not module.has_adapter(name):
                continue
            term = module.regularization_loss(name)
            if term is not None:
                terms.append(term.float())
    if terms:
        return torch.stack([t.to(terms[0].device) for t in terms]).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)
