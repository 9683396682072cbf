"""Checkpoints of a training run and what an exact resume needs.

A checkpoint folder ``checkpoints/step-N/`` holds the trainable tensors (``trainable.safetensors``),
the PEFT adapter folder (``adapter/``), ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` (fp16 runs),
every process's RNG state (``rng_rank{R}.pt``) and the :class:`TrainerState` (``trainer_state.json``).
``COMPLETE`` is written last; the folder is filled under a hidden staging name and published by
:func:`orthoft.io.files.publish_directory`, so a kill at any point leaves the previous checkpoint
as the latest complete one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ..io.files import publish_directory, sync_tree
from .recipe import Recipe, RecipeError

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
# what a run writes into its output_dir; an earlier run's copies are refused or cleared first
RUN_FILES = ("metrics.jsonl", "curves.png", "summary.json", "orthogonality.json", "recipe.yaml", "final", CHECKPOINTS)
# sections that must not change between a run and its resume, or the resume is not exact
RESUME_FIXED = ("model", "adapter", "data", "optim")
RESUME_FIXED_TRAIN = ("seed", "batch_size", "gradient_accumulation_steps", "lr_scheduler", "warmup_steps")


@dataclass
class TrainerState:
    """Where a run stands; saved in every checkpoint as ``trainer_state.json``."""

    step: int = 0  # optimizer steps done
    micro_batch: int = 0  # micro-batches consumed (per process; the data position)
    tokens_seen: int = 0  # non-padding tokens over all processes
    train_seconds: float = 0.0  # time in training steps, over all restarts
    world_size: int = 1


# ---- RNG and tensors ---------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) random states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by its parameter name (adapter weights, modules_to_save heads), on CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``tensors`` (from :func:`trainable_state`) into ``model``'s trainable parameters."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise RuntimeError(
            f"{source}: the checkpoint's trainable tensors do not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); it was written by a different recipe."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))


def adapter_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and float32 values of ``tensors``: equal digests, equal adapters."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` as a safetensors file."""
    save_file(tensors, str(path))


# ---- checkpoints -------------------------------------------------------------------------------
def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = output_dir / CHECKPOINTS
    done = [p for p in root.glob("step-*") if (p / COMPLETE_MARKER).is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def save_checkpoint(
    output_dir: Path,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    keep_checkpoints: int,
) -> Path:
    """Write ``checkpoints/step-N`` (called on every process); keeps the newest ``keep_checkpoints``."""
    root = output_dir / CHECKPOINTS
    target = root / f"step-{state.step:06d}"
    # a name every process knows without asking: each writes its RNG file there before the main one publishes
    staging = root / f".staging-step-{state.step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while writing this step
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), staging / f"rng_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_tensors(trainable_state(model), staging / "trainable.safetensors")
        model.save_pretrained(str(staging / "adapter"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), staging / "scaler.pt")
        (staging / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
        (staging / COMPLETE_MARKER).write_text(f"step {state.step}\n", encoding="utf-8")  # last
        sync_tree(staging)
        publish_directory(staging, target, overwrite=True)
        done = sorted(p for p in root.glob("step-*") if (p / COMPLETE_MARKER).is_file())
        for old in done[:-keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(
    checkpoint: Path, accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainerState:
    """Restore what :func:`save_checkpoint` wrote (this process's RNG state included); the saved state."""
    load_trainable(model, load_file(str(checkpoint / "trainable.safetensors")), checkpoint)
    # our own files: they hold numpy RNG state and optimizer options, not only tensors
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    if accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=False))
    rng_file = checkpoint / f"rng_rank{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise RuntimeError(f"{checkpoint}: no {rng_file.name}; it was written by fewer processes than this run has.")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainerState(**json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")))


# ---- the run folder ----------------------------------------------------------------------------
def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
    """The checkpoint to resume from (or None); clears or refuses an old run's files as asked."""
    checkpoint = latest_checkpoint(output_dir) if resume else None
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    if checkpoint is None and existing:
        if not (overwrite or resume):
            raise FileExistsError(
                f"{output_dir} already holds a run ({', '.join(existing)}). Pass --resume to continue it, "
                "--overwrite to start over, or set train.output_dir elsewhere."
            )
        if is_main:
            for name in existing:
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return checkpoint


def check_resumable(recipe: Recipe, output_dir: Path) -> None:
    """RecipeError when ``recipe`` differs from the run's saved ``recipe.yaml`` where an exact resume needs equality."""
    saved_path = output_dir / "recipe.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    current = recipe.to_dict()
    for section in RESUME_FIXED:
        if saved.get(section) != current.get(section):
            raise RecipeError(
                f"--resume: section {section!r} differs from the run's {saved_path}; a resume is only exact with "
                f"the same recipe. Saved: {saved.get(section)}; now: {current.get(section)}."
            )
    for key in RESUME_FIXED_TRAIN:
        if saved.get("train", {}).get(key) != current["train"][key]:
            raise RecipeError(
                f"--resume: train.{key} was {saved['train'].get(key)!r} in {saved_path}, now {current['train'][key]!r}."
            )


__all__ = [
    "CHECKPOINTS",
    "COMPLETE_MARKER",
    "RUN_FILES",
    "TrainerState",
    "adapter_digest",
    "check_resumable",
    "latest_checkpoint",
    "load_checkpoint",
    "load_trainable",
    "prepare_output_dir",
    "rng_state",
    "save_checkpoint",
    "save_tensors",
    "set_rng_state",
    "trainable_state",
]
