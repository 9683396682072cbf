"""Checkpoints of a training run and what an exact resume needs.

A checkpoint folder ``checkpoints/step-N/`` holds the trainable tensors (``trainable.safetensors``),
the PEFT adapter folder (``adapter/``), ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` (fp16 runs),
every process's RNG state (``rng_rank{R}.pt``) and the :class:`TrainerState` (``trainer_state.json``).
``MANIFEST.json`` records every file's size and sha256 and ``COMPLETE`` is written last; the folder
is filled under a hidden staging name, fsynced and published by
:func:`orthoft.io.files.publish_directory`, so a kill or a power cut at any point leaves the previous
checkpoint as the latest complete one, and ``--resume`` can tell (and skip) a checkpoint damaged
on disk since (:func:`resumable_checkpoints`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ..io.files import publish_directory, staged_directory, sync_tree
from .recipe import Recipe, RecipeError

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
# what a run writes into its output_dir; an earlier run's copies are refused, or set aside by --overwrite
RUN_FILES = (
    "metrics.jsonl",
    "curves.png",
    "summary.json",
    "orthogonality.json",
    "recipe.yaml",
    "final",
    CHECKPOINTS,
    "merged",
    "trackers",  # report_to: TensorBoard event files and other trackers' local logs
)


class CheckpointError(RecipeError):
    """A checkpoint cannot be resumed from (missing, damaged, or written by another recipe); says which file."""


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
        raise CheckpointError(
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


def honour_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` the permissions the umask allows (safetensors writes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` as a safetensors file."""
    save_file(tensors, str(path))


def save_final(model: torch.nn.Module, tensors: dict[str, torch.Tensor], final_dir: Path) -> None:
    """``final/`` (``adapter/`` and ``trainable.safetensors``) through the staged writer: complete or absent."""
    with staged_directory(final_dir) as staging:
        model.save_pretrained(str(staging / "adapter"))
        save_tensors(tensors, staging / "trainable.safetensors")
        honour_umask(staging)


# ---- checkpoints -------------------------------------------------------------------------------
def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` (``checkpoints/``) whose write finished (``COMPLETE``), oldest first."""
    done = [p for p in root.glob("step-*") if (p / COMPLETE_MARKER).is_file()] if root.is_dir() else []
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None (not verified: see :func:`verify_checkpoint`)."""
    done = complete_checkpoints(output_dir / CHECKPOINTS)
    return done[-1] if done else None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """``MANIFEST.json``: size and sha256 of every file in ``folder``, so a resume can tell a damaged checkpoint."""
    files = {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": file_digest(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")


def verify_checkpoint(checkpoint: Path) -> str | None:
    """None when every file matches the manifest written at save time; else what is wrong, naming the file."""
    if not (checkpoint / COMPLETE_MARKER).is_file():
        return f"{checkpoint}: no {COMPLETE_MARKER} marker (its write was interrupted)"
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        return None  # written before checkpoints had manifests: loading it is the only check
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest_path} is unreadable ({err})"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size} bytes, {expected['size']} were saved (truncated or overwritten)"
        if file_digest(path) != expected["sha256"]:
            return f"{path} does not match the sha256 recorded when it was saved (corrupted on disk)"
    return None


def save_checkpoint(
    output_dir: Path,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    keep_checkpoints: int,
) -> Path:
    """Write ``checkpoints/step-N`` (called on every process); keeps the newest ``keep_checkpoints``.

    Files are written under a hidden staging name, listed with their sizes and hashes in
    ``MANIFEST.json``, marked ``COMPLETE`` last, fsynced, and published by one rename: a kill or
    a power cut at any point leaves the previous checkpoint as the latest complete one. On an
    error (a full disk) the staging folder is removed and the error raised.
    """
    root = output_dir / CHECKPOINTS
    target = root / f"step-{state.step:06d}"
    # a name every process knows without asking: each writes its RNG file there before the main one publishes
    staging = root / f".staging-step-{state.step:06d}"
    try:
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
            write_manifest(staging, state.step)
            (staging / COMPLETE_MARKER).write_text(f"step {state.step}\n", encoding="utf-8")  # last
            honour_umask(staging)
            sync_tree(staging)
            publish_directory(staging, target, overwrite=True)
            for old in complete_checkpoints(root)[:-keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return target


def resumable_checkpoints(output_dir: Path, warn: Callable[[str], None]) -> list[Path]:
    """Complete checkpoints that pass :func:`verify_checkpoint`, newest first; each damaged one is ``warn``-ed.

    CheckpointError naming every problem when there is none to resume from.
    """
    done = complete_checkpoints(output_dir / CHECKPOINTS)
    if not done:
        raise CheckpointError(
            f"--resume: {output_dir} has no complete checkpoint (checkpoints/step-N/{COMPLETE_MARKER}), so there is "
            "nothing to resume. Fix: run without --resume (add --overwrite to replace the earlier run's files), "
            "and set train.save_every to get checkpoints."
        )
    intact, problems = [], []
    for checkpoint in reversed(done):
        problem = verify_checkpoint(checkpoint)
        if problem is None:
            intact.append(checkpoint)
            continue
        problems.append(problem)
        if not intact:
            warn(f"checkpoint {checkpoint.name} is damaged: {problem}; trying the one before it")
    if not intact:
        raise CheckpointError(
            f"--resume: no intact checkpoint in {output_dir / CHECKPOINTS}: {'; '.join(problems)}. "
            "Fix: start over with --overwrite."
        )
    return intact


def load_checkpoint(
    checkpoint: Path, accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainerState:
    """Restore what :func:`save_checkpoint` wrote (this process's RNG state included); the saved state.

    CheckpointError naming the file that cannot be read.
    """
    rng_file = checkpoint / f"rng_rank{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{checkpoint}: no {rng_file.name}; it was written by fewer processes than this run has.")
    name = "trainable.safetensors"
    try:
        load_trainable(model, load_file(str(checkpoint / name)), checkpoint)
        # our own files: they hold numpy RNG state and optimizer options, not only tensors
        name = "optimizer.pt"
        optimizer.load_state_dict(torch.load(checkpoint / name, map_location="cpu", weights_only=False))
        name = "scheduler.pt"
        scheduler.load_state_dict(torch.load(checkpoint / name, weights_only=False))
        name = "scaler.pt"
        if accelerator.scaler is not None and (checkpoint / name).is_file():
            accelerator.scaler.load_state_dict(torch.load(checkpoint / name, weights_only=False))
        name = rng_file.name
        set_rng_state(torch.load(rng_file, weights_only=False))
        name = "trainer_state.json"
        return TrainerState(**json.loads((checkpoint / name).read_text(encoding="utf-8")))
    except CheckpointError:
        raise
    except Exception as err:  # safetensors, pickle, JSON and shape errors alike: the file is not what was saved
        raise CheckpointError(f"{checkpoint / name} cannot be loaded ({type(err).__name__}: {err})") from err


def load_newest(
    candidates: list[Path],
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    warn: Callable[[str], None],
) -> tuple[Path, TrainerState]:
    """Load the newest of ``candidates`` that loads (a damaged one is ``warn``-ed and skipped): (it, its state).

    A later load replaces everything an earlier, failed one restored, so a skipped checkpoint leaves nothing behind.
    """
    problems = []
    for checkpoint in candidates:
        try:
            return checkpoint, load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler)
        except CheckpointError as err:
            problems.append(str(err))
            warn(f"checkpoint {checkpoint.name} cannot be loaded: {err}; trying the one before it")
    raise CheckpointError(
        f"--resume: no checkpoint of this run loads: {'; '.join(problems)}. Fix: start over with --overwrite."
    )


def check_resumable(recipe: Recipe, output_dir: Path) -> None:
    """RecipeError when ``recipe`` differs from the run's saved ``recipe.yaml`` where an exact resume needs equality."""
    saved_path = output_dir / "recipe.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RecipeError(
            f"--resume: {saved_path} (the run's saved recipe) is not readable YAML ({err}); restore it from your "
            "recipe file to resume."
        ) from err
    if not isinstance(saved, dict):
        raise RecipeError(f"--resume: {saved_path} (the run's saved recipe) is not a recipe mapping; restore it.")
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
                f"--resume: train.{key} was {saved.get('train', {}).get(key)!r} in {saved_path}, now "
                f"{current['train'][key]!r}; an exact resume needs the same value."
            )


__all__ = [
    "CHECKPOINTS",
    "COMPLETE_MARKER",
    "MANIFEST",
    "RUN_FILES",
    "CheckpointError",
    "TrainerState",
    "adapter_digest",
    "check_resumable",
    "complete_checkpoints",
    "file_digest",
    "honour_umask",
    "latest_checkpoint",
    "load_checkpoint",
    "load_newest",
    "load_trainable",
    "resumable_checkpoints",
    "rng_state",
    "save_checkpoint",
    "save_final",
    "save_tensors",
    "set_rng_state",
    "trainable_state",
    "verify_checkpoint",
    "write_manifest",
]
