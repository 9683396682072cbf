"""Non-finite training: find where a NaN or inf first appears, so the run can stop before it reaches the weights.

The loop checks each optimizer step's loss and gradients before the update
(:func:`non_finite_report`); a non-finite value stops the run with :class:`NonFiniteError` naming
the step and the first parameter (or, for a loss that is non-finite with finite weights, the first
module whose output is), so the latest checkpoint stays the last good one and no NaN adapter is
ever written as ``final/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import latest_checkpoint

FIX = (
    "Fix: lower optim.lr, set train.max_grad_norm, or use a more stable precision (train.mixed_precision: no or bf16)."
)


class NonFiniteError(FloatingPointError, ValueError):
    """The loss, a gradient or a weight became NaN or inf; the message names the step and the first layer."""


def first_non_finite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """The name of the first tensor with a NaN or inf (None entries are skipped), or None."""
    named = [(name, t) for name, t in named if t is not None]
    if not named:
        return None
    # one device sync for the common all-finite case; names only when something is wrong
    flags = torch.stack([torch.isfinite(t.detach()).all().to("cpu", non_blocking=True) for _, t in named])
    if bool(flags.all()):
        return None
    return named[int((~flags).nonzero()[0])][0]


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((o for o in values if isinstance(o, torch.Tensor)), None)


def first_non_finite_output(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Any = None) -> str | None:
    """Run ``model`` on ``batch`` again and name the first module (in execution order) with a non-finite output."""
    found: list[str] = []

    def hook(name: str) -> Callable:
        def check(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if found or tensor is None or not tensor.is_floating_point():
                return
            if not bool(torch.isfinite(tensor).all()):
                found.append(name)

        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad(), autocast() if autocast is not None else contextlib.nullcontext():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def non_finite_report(
    model: torch.nn.Module,
    loss: float,
    batch: dict[str, torch.Tensor] | None,
    check_grads: bool = True,
    autocast: Any = None,
) -> str | None:
    """None when the loss and (with ``check_grads``) every trainable gradient are finite; else what and where."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    weight = first_non_finite(trainable)
    if weight is not None:
        return f"the weights of {weight} are not finite"
    grad = first_non_finite((name, p.grad) for name, p in trainable) if check_grads else None
    if torch.isfinite(torch.tensor(loss)):
        return None if grad is None else f"the loss is {loss} but the gradient of {grad} is not finite"
    # a non-finite loss makes every gradient non-finite: where the forward pass first broke says more
    module = first_non_finite_output(model, batch, autocast) if batch is not None else None
    where = f"the output of {module}" if module is not None else f"the gradient of {grad}" if grad else None
    return f"the training loss is {loss}" + (f"; the first non-finite value is in {where}" if where else "")


def check_finite(
    model: torch.nn.Module, loss: float, batch: dict[str, torch.Tensor], step: int, output_dir: Path, accelerator: Any
) -> None:
    """NonFiniteError naming ``step`` and the first layer when the loss or a gradient is NaN/inf (before the update).

    Under fp16 the grad scaler skips steps with inf gradients by design: only the loss is checked then.
    """
    problem = non_finite_report(model, loss, batch, accelerator.scaler is None, accelerator.autocast)
    if problem is None:
        return
    latest = latest_checkpoint(output_dir)
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written"
    raise NonFiniteError(f"step {step}: {problem}. The run stopped; {kept}; final/ was not written. {FIX}")


def check_final(tensors: dict[str, torch.Tensor]) -> None:
    """NonFiniteError naming the first non-finite tensor of the adapter about to be saved as ``final/``."""
    bad = first_non_finite(tensors.items())
    if bad is not None:
        raise NonFiniteError(f"the trained weights of {bad} are not finite; final/ was not written. {FIX}")


__all__ = [
    "FIX",
    "NonFiniteError",
    "check_final",
    "check_finite",
    "first_non_finite",
    "first_non_finite_output",
    "non_finite_report",
]
