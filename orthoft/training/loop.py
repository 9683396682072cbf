"""The Accelerate training loop behind ``orthoft train``.

One process (CPU or GPU) or several (``accelerate launch`` / ``torchrun``; gloo on CPU, NCCL on
GPUs), DDP over the adapter parameters only. What a run writes under ``train.output_dir``::

    recipe.yaml            the validated recipe (with overrides applied)
    metrics.jsonl          one JSON object per event: train (every log_every steps), eval, sample, final
    curves.png             training loss and evaluation metric against steps
    checkpoints/step-N/    trainable.safetensors, adapter/ (PEFT folder), optimizer.pt, scheduler.pt,
                           rng_rank{R}.pt, trainer_state.json; COMPLETE marks a finished write
    final/adapter/         the trained adapter (``PeftModel.from_pretrained`` loads it)
    orthogonality.json     per-layer diagnostics (see orthoft.evaluation)
    summary.json           parameters, metrics before/after, times, export path
    merged/                merged export (when export.enabled and orthoft.export exists)

Exact resume: checkpoints are taken at optimizer-step boundaries and hold the trainable tensors,
optimizer, scheduler, grad scaler, every process's RNG state and the data position. The batch
order is a pure function of (seed, epoch, position) (``data.BatchPlan``), so a resumed run replays
the same batches with the same random numbers and ends with the same weights as one that never
stopped. Checkpoints are written to a staging folder and renamed, so a kill mid-write leaves the
previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .data import BatchPlan, build_task_data, collate
from .models import build_peft_model, count_parameters, load_base_model, load_tokenizer
from .recipe import Recipe, RecipeError

logger = logging.getLogger("orthoft.train")

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
RUN_FILES = ("metrics.jsonl", "curves.png", "summary.json", "orthogonality.json", "recipe.yaml", "final", CHECKPOINTS)
# sections that must not change between a run and its resume, or the resume is not exact
RESUME_FIXED = ("model", "adapter", "data", "optim")
RESUME_FIXED_TRAIN = ("seed", "batch_size", "gradient_accumulation_steps", "lr_scheduler", "warmup_steps")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    micro_batch: int = 0  # micro-batches consumed (per process; the data position)
    tokens_seen: int = 0  # non-padding tokens over all processes
    train_seconds: float = 0.0  # time in training steps, over all restarts
    world_size: int = 1


# ---- small utilities ---------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by its parameter name (adapter weights, modules_to_save heads), on CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
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


def _adapter_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = output_dir / CHECKPOINTS
    done = [p for p in root.glob("step-*") if (p / COMPLETE_MARKER).is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


class MetricsLog:
    """Append-only JSONL log, written by the main process only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (work a killed run did past its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step and r.get("event") != "final"]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_curves(records: list[dict[str, Any]], path: Path) -> bool:
    """Training loss (and evaluation loss) left, the evaluation metric right. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    metric = next((m for m in ("perplexity", "accuracy", "f1") if any(m in r for r in evals)), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(11 if metric else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    eval_loss = [r for r in evals if "loss" in r]
    if eval_loss:
        ax.plot([r["step"] for r in eval_loss], [r["loss"] for r in eval_loss], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)" if eval_loss else "loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if metric:
        ax = axes[0][1]
        points = [r for r in evals if metric in r]
        ax.plot([r["step"] for r in points], [r[metric] for r in points], "o-", color="tab:green")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"eval {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _resolve_mixed_precision(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _regularization(model: torch.nn.Module) -> torch.Tensor | None:
    """``orthoft.regularization_loss(model)`` when orthoft provides it (methods with a penalty), else None."""
    import orthoft

    function = getattr(orthoft, "regularization_loss", None)
    if function is None:
        return None
    value = function(model)
    if value is None or (isinstance(value, (int, float)) and value == 0):
        return None
    return value


def _build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    optim = recipe.optim
    kwargs = dict(optim.options)
    kwargs["weight_decay"] = optim.weight_decay
    if optim.adamw_lr is not None:
        kwargs["adamw_lr"] = optim.adamw_lr
    try:
        from orthoft.optim import build_optimizer
    except ImportError as err:
        if optim.name.lower() != "adamw":
            raise RecipeError(
                f"optim.name: {optim.name!r} needs orthoft.optim, which failed to import ({err}). "
                "Use optim.name: adamw."
            ) from err
        kwargs.pop("adamw_lr", None)  # one group: the adapter lr applies to everything
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=optim.lr, **kwargs)
    if optim.name.lower() == "adamw":
        kwargs.pop("adamw_lr", None)  # build_optimizer's adamw puts every tensor in one group
    try:
        return build_optimizer(model, optim.name, lr=optim.lr, **kwargs)
    except TypeError as err:
        raise RecipeError(f"optim.options: {optim.options} not accepted by optimizer {optim.name!r}: {err}") from err


def _export(peft_model: torch.nn.Module, tokenizer: Any, recipe: Recipe, output_dir: Path) -> str | None:
    """Merged export via ``orthoft.export.export_merged``; None (with a warning) when that does not exist."""
    try:
        from orthoft import export as export_module
    except ModuleNotFoundError as err:
        if err.name != "orthoft.export":
            raise
        logger.warning("export skipped: orthoft.export is not available in this version of orthoft.")
        return None
    export_merged = getattr(export_module, "export_merged", None)
    if export_merged is None:
        logger.warning("export skipped: orthoft.export has no export_merged().")
        return None
    out_dir = Path(recipe.export.output_dir) if recipe.export.output_dir else output_dir / "merged"
    dtype = None if recipe.export.dtype == "auto" else recipe.export.dtype
    export_merged(
        peft_model, out_dir, dtype=dtype, quantization=recipe.export.quantization, tokenizer=tokenizer, overwrite=True
    )
    return str(out_dir)


def _prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
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


def _check_resumable(recipe: Recipe, output_dir: Path) -> None:
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


# ---- the loop ----------------------------------------------------------------------------------
def train(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run a recipe; returns the summary written to ``summary.json`` (on every process)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    import orthoft  # noqa: F401  (registers the methods with PEFT)

    wall_start = time.perf_counter()
    phases: dict[str, float] = {}  # seconds per phase, for the summary

    @contextlib.contextmanager
    def timed(phase: str):
        start = time.perf_counter()
        yield
        phases[phase] = round(phases.get(phase, 0.0) + time.perf_counter() - start, 2)
    distributed_env = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        mixed_precision=_resolve_mixed_precision(recipe.train.mixed_precision),
        # Accelerate only starts a gloo process group on CPU when told it is a CPU run
        cpu=distributed_env and not torch.cuda.is_available(),
    )
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    _configure_logging(is_main)
    output_dir = recipe.output_dir()
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    checkpoint = _prepare_output_dir(output_dir, resume, overwrite, is_main)
    if checkpoint is not None:
        _check_resumable(recipe, output_dir)
    accelerator.wait_for_everyone()
    log = MetricsLog(output_dir / "metrics.jsonl", is_main)
    if is_main:
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")

    # -- model, data, optimizer
    set_seed(recipe.train.seed)
    with timed("load_model"):
        tokenizer = load_tokenizer(recipe.model)
        device_map = {"": accelerator.local_process_index} if torch.cuda.is_available() else "cpu"
        base_model, compute_dtype = load_base_model(
            recipe.model, tokenizer, device_map=device_map, seed=recipe.train.seed
        )
        model = build_peft_model(
            base_model,
            recipe.adapter,
            recipe.model.task,
            recipe.model.name_or_path,
            recipe.train.gradient_checkpointing,
        )
    trainable_params, total_params = count_parameters(model)
    with timed("load_data"):
        data = build_task_data(recipe.data, tokenizer, recipe.model.task, recipe.train.seed)
    optimizer = _build_optimizer(model, recipe)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        recipe.train.lr_scheduler,
        optimizer,
        num_warmup_steps=recipe.train.warmup_steps,
        num_training_steps=recipe.train.max_steps,
    )
    # the scheduler is stepped by hand: Accelerate's wrapper would step it once per process
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    plan = BatchPlan(len(data.train), recipe.train.batch_size, world, recipe.train.seed)
    eval_batch_size = recipe.eval.batch_size or recipe.train.batch_size
    pad_id = tokenizer.pad_token_id
    metric_names = recipe.metrics()
    logger.info(
        "%s | %s %s | %d processes (%s), mixed precision %s, compute dtype %s",
        recipe.source_path,
        recipe.adapter.method,
        recipe.adapter.options,
        world,
        accelerator.device,
        accelerator.mixed_precision,
        compute_dtype,
    )
    logger.info(
        "trainable parameters: %s of %s (%.3f%%) | data: %s | train %d, eval %d examples",
        f"{trainable_params:,}",
        f"{total_params:,}",
        100 * trainable_params / max(total_params, 1),
        data.description,
        len(data.train),
        len(data.eval),
    )

    def run_eval(examples: list[dict[str, Any]]) -> dict[str, float]:
        from orthoft.evaluation import evaluate_examples

        with timed("evaluate"):
            return evaluate_examples(
                unwrapped,
                examples,
                data.kind,
                metric_names,
                eval_batch_size,
                pad_id,
                accelerator.device,
                max_batches=recipe.eval.max_batches,
                autocast=accelerator.autocast,
            )

    def sample(label: str, step: int) -> None:
        if not (recipe.eval.generate_prompt and data.kind == "lm" and is_main):
            return
        from orthoft.evaluation import generate_sample

        with accelerator.autocast(), timed("generate"):
            text = generate_sample(
                unwrapped,
                tokenizer,
                recipe.eval.generate_prompt,
                recipe.eval.max_new_tokens,
                accelerator.device,
                chat=recipe.data.use_chat_template,
            )
        prompt = recipe.eval.generate_prompt
        log.write({"event": "sample", "phase": label, "step": step, "prompt": prompt, "text": text})
        tqdm.write(f"--- sample ({label}) ---\n{recipe.eval.generate_prompt}{text}\n---")

    # -- resume or start
    state = TrainerState(world_size=world)
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, accelerator, unwrapped, optimizer, scheduler, rank)
        if state.world_size != world:
            raise RecipeError(
                f"--resume: {checkpoint} was written by {state.world_size} processes, this run has {world}; the data "
                "order depends on the process count, so resume with the same number of processes."
            )
        log.truncate_after(state.step)
        logger.info("resumed from %s (step %d of %d)", checkpoint, state.step, recipe.train.max_steps)
    elif recipe.eval.eval_before:
        before = run_eval(data.eval)
        log.write({"event": "eval", "phase": "before", "step": 0, **before})
        logger.info("before training: %s", _format(before))
        sample("before", 0)

    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    progress = tqdm(
        total=recipe.train.max_steps, initial=state.step, disable=not is_main, desc="train", dynamic_ncols=True
    )
    accumulation = recipe.train.gradient_accumulation_steps
    while state.step < recipe.train.max_steps:
        step_start = time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)
        reg_sum = torch.zeros((), device=accelerator.device)
        tokens = 0
        for micro in range(accumulation):
            batch = collate([data.train[i] for i in plan.indices(state.micro_batch, rank)], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            state.micro_batch += 1
            tokens += int(batch["attention_mask"].sum())
            # gradients are all-reduced once per optimizer step, on the last micro-batch
            sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    loss = model(**batch).loss.float()
                total = loss
                penalty = _regularization(unwrapped)
                if penalty is not None:
                    total = total + penalty.float()
                    reg_sum += penalty.detach().float()
                accelerator.backward(total / accumulation)
            loss_sum += loss.detach()
        grad_norm = None
        if recipe.train.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(trainable, recipe.train.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in step with updates
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        step_time = time.perf_counter() - step_start
        state.train_seconds += step_time
        global_tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))
        state.tokens_seen += global_tokens
        loss_value = float(accelerator.reduce(loss_sum / accumulation, "mean"))
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"step {state.step}: training loss is {loss_value}. Lower optim.lr, set train.max_grad_norm, or "
                "use a more stable precision (train.mixed_precision: no / bf16)."
            )
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{global_tokens / step_time:.0f}")
        if state.step % recipe.train.log_every == 0 or state.step == recipe.train.max_steps:
            record: dict[str, Any] = {
                "event": "train",
                "step": state.step,
                "epoch": round(plan.epoch_of(state.micro_batch), 4),
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": global_tokens / step_time,
                "step_time_s": step_time,
                "train_seconds": state.train_seconds,
            }
            if penalty is not None:
                record["reg_loss"] = float(accelerator.reduce(reg_sum / accumulation, "mean"))
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            log.write(record)
        eval_every, save_every = recipe.train.eval_every, recipe.train.save_every
        if eval_every and state.step % eval_every == 0 and state.step < recipe.train.max_steps:
            metrics = run_eval(data.eval)
            log.write({"event": "eval", "step": state.step, **metrics})
            progress.write(f"step {state.step}: eval {_format(metrics)}")
            if is_main:
                plot_curves(log.records(), output_dir / "curves.png")
        if save_every and state.step % save_every == 0:
            with timed("checkpoint"):
                _save_checkpoint(output_dir, accelerator, unwrapped, optimizer, scheduler, state, recipe, rank)
        if recipe.train.kill_after_step == state.step:
            progress.close()
            logger.warning("train.kill_after_step=%d: killing this process (testing hook)", state.step)
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()

    # -- after training
    accelerator.wait_for_everyone()
    final = trainable_state(unwrapped)
    flat = torch.cat([final[k].float().reshape(-1) for k in sorted(final)]).to(accelerator.device)
    gathered = accelerator.gather(flat[None])  # (processes, n): DDP must have kept them identical
    spread = float((gathered - gathered[:1]).abs().max())
    from accelerate.utils import gather_object

    digests = gather_object([_adapter_digest(final)])
    if spread > 0:
        logger.warning("adapter weights differ across processes (max |diff| %.3g): DDP went out of sync", spread)
    final_dir = output_dir / "final"
    if is_main:
        (final_dir / "adapter").mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(str(final_dir / "adapter"))
        _save_tensors(final, final_dir / "trainable.safetensors")
    after = run_eval(data.eval)
    log.write({"event": "eval", "phase": "after", "step": state.step, **after})
    test_metrics = run_eval(data.test) if data.test else None
    sample("after", state.step)
    orthogonality = None
    export_path = None
    if is_main:
        if recipe.eval.orthogonality:
            from orthoft.evaluation import format_orthogonality, orthogonality_report

            with timed("orthogonality"):
                orthogonality = orthogonality_report(unwrapped)
            (output_dir / "orthogonality.json").write_text(json.dumps(orthogonality, indent=2), encoding="utf-8")
            tqdm.write(format_orthogonality(orthogonality, limit=5))
        if recipe.export.enabled:
            unwrapped.eval()
            with timed("export"):
                export_path = _export(unwrapped, tokenizer, recipe, output_dir)
    before = next((r for r in log.records() if r.get("phase") == "before"), None) if is_main else None
    summary = {
        "recipe": recipe.source_path,
        "method": recipe.adapter.method,
        "optimizer": recipe.optim.name,
        "processes": world,
        "steps": state.step,
        "trainable_parameters": trainable_params,
        "total_parameters": total_params,
        "tokens_seen": state.tokens_seen,
        "train_seconds": round(state.train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - wall_start, 2),
        "phase_seconds": phases,
        "before": {k: v for k, v in before.items() if k not in ("event", "phase", "step")} if before else None,
        "after": after,
        "test": test_metrics,
        "orthogonality": orthogonality["summary"] if orthogonality else None,
        "adapter_dir": str(final_dir / "adapter"),
        "adapter_sha256_per_rank": digests,
        "rank_max_abs_diff": spread,
        "export_path": export_path,
    }
    log.write({"event": "final", "step": state.step, **{k: summary[k] for k in ("after", "test", "rank_max_abs_diff")}})
    if is_main:
        plot_curves(log.records(), output_dir / "curves.png")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        _print_summary(summary, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _save_checkpoint(
    output_dir: Path,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: TrainerState,
    recipe: Recipe,
    rank: int,
) -> None:
    root = output_dir / CHECKPOINTS
    final = root / f"step-{state.step:06d}"
    staging = root / f".staging-step-{state.step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), staging / f"rng_rank{rank}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_tensors(trainable_state(model), staging / "trainable.safetensors")
        model.save_pretrained(str(staging / "adapter"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), staging / "scaler.pt")
        (staging / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
        (staging / COMPLETE_MARKER).write_text(f"step {state.step}\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        done = sorted(p for p in root.glob("step-*") if (p / COMPLETE_MARKER).is_file())
        for old in done[: -recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(
    checkpoint: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any, rank: int
) -> TrainerState:
    from safetensors.torch import load_file

    _load_trainable(model, load_file(str(checkpoint / "trainable.safetensors")), checkpoint)
    # our own files: they hold numpy RNG state and optimizer options, not only tensors
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    if accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=False))
    rng_file = checkpoint / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise RuntimeError(f"{checkpoint}: no {rng_file.name}; it was written by fewer processes than this run has.")
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainerState(**json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")))


def _format(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _print_summary(summary: dict[str, Any], output_dir: Path) -> None:
    lines = [
        "=" * 60,
        f"run: {summary['recipe']} ({summary['method']}, optimizer {summary['optimizer']}, {summary['steps']} steps)",
        f"trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,}",
    ]
    before, after = summary["before"] or {}, summary["after"]
    for key in ("perplexity", "accuracy", "f1"):
        if key in after:
            was = f"{before[key]:.4f} -> " if key in before else ""
            lines.append(f"eval {key}: {was}{after[key]:.4f}")
    if summary["test"]:
        lines.append(f"test: {_format(summary['test'])}")
    lines.append(f"time: {summary['wall_seconds']:.1f} s wall, {summary['train_seconds']:.1f} s in training steps")
    lines.append("  phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["phase_seconds"].items()))
    lines.append(f"adapter: {summary['adapter_dir']}")
    lines.append(f"export: {summary['export_path'] or 'not written (export disabled or orthoft.export missing)'}")
    lines.append(f"metrics: {output_dir / 'metrics.jsonl'}, curves: {output_dir / 'curves.png'}")
    print("\n".join(lines + ["=" * 60]), flush=True)


def _configure_logging(is_main: bool) -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[orthoft] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False


__all__ = ["TrainerState", "latest_checkpoint", "plot_curves", "train", "trainable_state"]
