"""Diagonal Fisher estimates of one adapter's tensors, the per-entry weights of ``"fisher"`` merging."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .merging import ortho_layers, tuner_of

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _activate(model: nn.Module, names: list[str]) -> None:
    """Activate ``names`` on the layers and, through a PeftModel, on its ``modules_to_save`` copies."""
    tuner = tuner_of(model)
    if model is not tuner and len(names) == 1 and hasattr(model, "set_adapter"):
        model.set_adapter(names[0])
    else:
        tuner.set_adapter(names if len(names) > 1 else names[0])


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's merged tensors keyed ``"<module name>.<tensor dict>"`` (the keys of :func:`estimate_fisher`)."""
    found = {}
    for layer_name, layer in ortho_layers(tuner_of(model)).items():
        for tensor_name in layer.merge_roles:
            container = getattr(layer, tensor_name, None)
            if container is not None and adapter_name in container:
                found[f"{layer_name}.{tensor_name}"] = container[adapter_name]
    return found


def estimate_fisher(
    model: nn.Module,
    adapter_name: str,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``E[g^2]`` of ``adapter_name``'s tensors over ``batches``.

    Each batch gives one gradient ``g`` of its loss with only ``adapter_name`` active (eval mode, so no
    dropout); the result is the mean of ``g**2`` over batches, float32, keyed like
    ``"<module name>.<tensor dict>"``. Batches of one example give the per-example empirical Fisher of
    Matena & Raffel; larger batches are cheaper and estimate the squared mean gradient instead.

    Args:
        model: a ``PeftModel`` with orthoft adapters (or its tuner).
        adapter_name: the adapter to estimate.
        batches: anything iterable; by default each batch is a dict passed as ``model(**batch)`` whose
            output has ``.loss`` (give ``labels``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for other models or batch layouts.

    The model's active adapters, train/eval mode and every ``requires_grad`` flag are restored.
    """
    tuner = tuner_of(model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(
            f"estimate_fisher: the model has no adapter {adapter_name!r} (it has {sorted(tuner.peft_config)}). "
            "Fix: load the adapter first."
        )
    tensors = adapter_tensors(model, adapter_name)
    previous = list(tuner.active_adapters)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    sums = {key: torch.zeros_like(t, dtype=torch.float32) for key, t in tensors.items()}
    count = 0
    try:
        _activate(model, [adapter_name])
        model.eval()
        for tensor in tensors.values():
            tensor.requires_grad_(True)
        keys = list(tensors)
        for batch in batches:
            loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
            grads = torch.autograd.grad(loss, [tensors[k] for k in keys], allow_unused=True)
            for key, grad in zip(keys, grads):
                if grad is not None:
                    sums[key] += grad.detach().float() ** 2
            count += 1
    finally:
        _activate(model, previous)
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
    if count == 0:
        raise ValueError("estimate_fisher: batches was empty. Fix: pass at least one batch of the adapter's task.")
    return {key: value / count for key, value in sums.items()}


__all__ = ["adapter_tensors", "estimate_fisher"]
