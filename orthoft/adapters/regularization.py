"""One call for every adapter's training penalty (qGOFT's quasi-orthogonality, HRA's Gram penalty, ...),
and how the penalty reaches the loss under any trainer with no user code.

Injecting an orthoft adapter puts a forward hook on the model it wraps (:func:`apply_penalty_in_training`;
every route reaches it: ``PeftModel``, ``PeftModelForCausalLM``, transformers' ``load_adapter``,
TRL's patched forward). In a training-mode forward that records gradients it calls
:func:`add_training_penalty`:

* When the model returns a loss (``labels`` given: transformers ``Trainer``, orthoft's own loop, a
  plain loop using ``outputs.loss``), the penalty is added to it, as PEFT's AdaLoRA adds its
  orthogonality penalty. Under ``Trainer`` with ``num_items_in_batch`` (the loss of a micro-batch is
  its share of the whole accumulated batch and ``Trainer`` does not divide by the accumulation
  steps) the penalty is weighted by the same share, so over one optimizer step it counts once, as
  in orthoft's loop: ``mean task loss + penalty``.
* When the caller computes the loss itself (TRL's fused LM head, ``compute_loss_func``, label
  smoothing, a loss from logits without labels), nothing in the model's outputs reaches the loss.
  The penalty's gradient is then added to the adapter gradients right before the next optimizer
  step (a torch optimizer step pre-hook, registered on first need), once per step. It is then
  outside gradient clipping, which runs before the step.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

from .base import OrthoLayer

logger = logging.getLogger(__name__)


def penalty_terms(model: nn.Module) -> list[torch.Tensor]:
    """Each active adapter's weighted penalty (float32) over every orthoft layer of ``model``."""
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
    return terms


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``layer.regularization_loss(name)`` over every orthoft layer and active adapter it holds.

    Each term is already weighted by its adapter config (``reg_lambda``). A ``PeftModel`` applies
    it by itself in training (see the module docstring): do not add it to its loss again; use this
    for logging (under ``torch.no_grad()``) or for a model that is not a ``PeftModel`` (layers
    injected by transformers' ``load_adapter``): ``loss = task_loss + orthoft.regularization_loss(model)``.
    Called with gradients on a ``PeftModel`` whose training forward already applied it, it warns
    (once per model) that adding it counts the penalty twice.

    Returns a 0-d float32 tensor on the device of the first term; a 0-d zero tensor (no grad, on
    the model's first parameter's device) when no layer has a penalty. Adapters that are not
    active, layers with adapters disabled, and methods without a penalty contribute nothing.
    """
    terms = penalty_terms(model)
    if terms:
        total = torch.stack([t.to(terms[0].device) for t in terms]).sum()
        if total.requires_grad and model.training:
            _warn_if_applied(model)
        return total
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)


def _warn_if_applied(model: nn.Module) -> None:
    applied = [module for module in model.modules() if module in _APPLIED]
    if not applied or any(module in _WARNED for module in applied):
        return
    _WARNED.update(applied)
    warnings.warn(
        "orthoft.regularization_loss(model) was called with gradients on a PeftModel whose training forward "
        "already applied the adapters' penalty (to outputs.loss, or before the optimizer step when the loss is "
        "computed outside the model). Adding it to the loss counts it twice. Fix: drop the addition, or compute "
        "it under torch.no_grad() for logging.",
        UserWarning,
        stacklevel=3,
    )


def _shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s loss shifts labels by one (causal LM), as ``Trainer`` decides when counting tokens."""
    config = getattr(model, "config", None)
    is_causal = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    return is_causal and not getattr(config, "is_encoder_decoder", False)


def batch_share(model: nn.Module, kwargs: Mapping[str, Any]) -> torch.Tensor | float:
    """The share of one optimizer step's loss that this forward's loss carries.

    1 without ``num_items_in_batch`` (the caller averages micro-batches, e.g. divides by the
    accumulation steps); with it, this micro-batch's counted labels over ``num_items_in_batch``,
    counted as ``Trainer`` counts them (``shift_labels``, else ``labels[..., 1:]`` for causal LMs).
    """
    items = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None and kwargs.get("labels") is not None:
        labels = kwargs["labels"][..., 1:] if _shifts_labels(model) else kwargs["labels"]
    if items is None or labels is None:
        return 1.0
    return labels.ne(-100).sum() / torch.as_tensor(items, device=labels.device).clamp(min=1)


def add_training_penalty(model: nn.Module, outputs: Any, kwargs: Mapping[str, Any]) -> None:
    """Add ``model``'s adapter penalty to ``outputs["loss"]``, or defer it to the next optimizer step.

    Called by the hook of :func:`apply_penalty_in_training` in a training-mode forward that records
    gradients; ``kwargs`` are that forward's keyword arguments. See the module docstring.
    """
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
    with _float32(model):  # as orthoft's loop computes it: outside autocast, in float32
        terms = [t for t in penalty_terms(model) if t.requires_grad]
        if not terms:
            return  # no penalty, or its adapters are frozen
        _APPLIED.add(model)
        if loss is None or kwargs.get("fused_lm_head"):
            # TRL's fused head returns a loss its trainers do not use: they compute theirs from log_probs
            defer_to_optimizer_step(model)
            return
        penalty = torch.stack([t.to(loss.device) for t in terms]).sum()
    outputs["loss"] = loss + (penalty * batch_share(model, kwargs)).to(loss.dtype)


def _float32(model: nn.Module) -> torch.autocast:
    """A context without autocast on ``model``'s device (penalties are sums of squares: float32 keeps them exact)."""
    param = next(model.parameters(), None)
    device_type = param.device.type if param is not None else "cpu"
    return torch.autocast(device_type if device_type in ("cuda", "cpu", "xpu", "mps") else "cpu", enabled=False)


def apply_penalty_in_training(model: nn.Module) -> None:
    """Hook ``model`` (once) so that its training forwards apply its adapters' penalty; see the module docstring."""
    if model not in _HOOKED:
        _HOOKED[model] = model.register_forward_hook(_penalty_hook, with_kwargs=True)


def _penalty_hook(module: nn.Module, args: Any, kwargs: dict[str, Any], outputs: Any) -> None:
    if module.training and torch.is_grad_enabled():
        add_training_penalty(module, outputs, kwargs)


# models hooked by apply_penalty_in_training, with the hook's handle
_HOOKED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
# models whose training forward could not carry the penalty since their last optimizer step
_DEFERRED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# models whose training forward applies the penalty by itself, and those already warned about counting it twice
_APPLIED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_HOOK: list[Any] = []  # the handle of the one global optimizer step pre-hook, once registered


def defer_to_optimizer_step(model: nn.Module) -> None:
    """Add ``model``'s penalty gradient to its adapters right before the next optimizer step over them."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_add_deferred_penalties))
        logger.info(
            "orthoft: the training loss is computed outside the model (e.g. TRL's fused LM head), so the "
            "adapters' penalty gradient is added before each optimizer step instead of through the loss."
        )
    _DEFERRED.add(model)


def _add_deferred_penalties(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _DEFERRED:
        return
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in list(_DEFERRED):
        params = [p for p in model.parameters() if p.requires_grad and id(p) in in_optimizer]
        if not params:
            continue  # another optimizer's model
        _DEFERRED.discard(model)
        with torch.enable_grad(), _float32(model):
            terms = [t for t in penalty_terms(model) if t.requires_grad]
            if not terms:
                continue
            penalty = torch.stack([t.to(terms[0].device) for t in terms]).sum()
            grads = torch.autograd.grad(penalty, params, allow_unused=True)
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = grad.to(param.dtype)
            else:
                param.grad.add_(grad.to(param.grad.dtype))
