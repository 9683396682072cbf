"""Pieces every Accelerate training loop of orthoft shares (LLM recipes and diffusion alike).

* :func:`make_accelerator`: an ``Accelerator`` with ``auto`` mixed precision resolved and, under
  ``torchrun``/``accelerate launch`` without GPUs, a gloo process group on CPU; experiment trackers
  (``report_to``) that are checked to be installed.
* :func:`float32_trainable`: trainable tensors in float32 under any autocast (rotations are built in
  float32 even for bf16/fp16 models).
* :func:`optimizer_update`: clip, step, schedule (not after an fp16 overflow skip), zero the grads.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..io.dtypes import auto_mixed_precision

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def resolve_mixed_precision(name: str) -> str:
    """``auto`` -> bf16/fp16 on GPUs, ``no`` on CPU; other values pass through."""
    if name not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision {name!r} is not one of {list(MIXED_PRECISION)}.")
    return auto_mixed_precision() if name == "auto" else name


def make_accelerator(
    mixed_precision: str = "auto",
    gradient_accumulation_steps: int = 1,
    log_with: list[str] | None = None,
    project_dir: str | os.PathLike | None = None,
) -> Any:
    """An ``accelerate.Accelerator`` for one process (CPU or GPU) or several (DDP; gloo on CPU).

    ``log_with``: Accelerate trackers (``tensorboard``, ``wandb``, ...) writing under ``project_dir``;
    ValueError when one is not installed (Accelerate itself would drop it without a word).
    """
    from accelerate import Accelerator
    from accelerate.tracking import get_available_trackers

    available = [str(tracker) for tracker in get_available_trackers()]
    missing = [name for name in log_with or [] if name != "all" and name not in available]
    if missing:
        raise ValueError(
            f"report_to: tracker {missing[0]!r} is not installed in this environment (installed: {available}). "
            f"Fix: pip install {missing[0]}, or drop it from report_to."
        )
    distributed_env = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        mixed_precision=resolve_mixed_precision(mixed_precision),
        gradient_accumulation_steps=gradient_accumulation_steps,
        # Accelerate only starts a gloo process group on CPU when told it is a CPU run
        cpu=distributed_env and not torch.cuda.is_available(),
        log_with=list(log_with) if log_with else None,
        project_dir=project_dir,
    )


def float32_trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters of ``model``, cast to float32 in place; ValueError when there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters. Fix: wrap it with get_peft_model "
            "and an orthoft config first (or check that the adapter is active and not in inference mode)."
        )
    for param in params:
        if param.dtype != torch.float32:
            param.data = param.data.float()
    return params


def optimizer_update(
    accelerator: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: list[torch.nn.Parameter],
    max_grad_norm: float | None,
) -> float | None:
    """One optimizer step on accumulated gradients; returns the gradient norm before clipping (or None)."""
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in step with updates
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


__all__ = ["MIXED_PRECISION", "float32_trainable", "make_accelerator", "optimizer_update", "resolve_mixed_precision"]
