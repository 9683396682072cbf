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
    merged/                merged export (when export.enabled)

Exact resume: checkpoints are taken at optimizer-step boundaries and hold the trainable tensors,
optimizer, scheduler, grad scaler, every process's RNG state and the data position. The batch
order is a pure function of (seed, epoch, position) (``data.BatchPlan``), so a resumed run replays
the same batches with the same random numbers and ends with the same weights as one that never
stopped. Checkpoints are written to a staging folder and renamed (``checkpoint``), so a kill
mid-write leaves the previous checkpoint as the latest complete one.

A run is a :class:`TrainingRun`: set up (``__init__``), :meth:`~TrainingRun.start` (resume or
evaluate before training), :meth:`~TrainingRun.run_step` per optimizer step (step, log, evaluate,
checkpoint), :meth:`~TrainingRun.finish` (final adapter, evaluation, export, summary).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..adapters import regularization_loss  # importing orthoft.adapters also registers the methods with PEFT
from ..evaluation import evaluate_examples, format_orthogonality, generate_sample, orthogonality_report
from ..export import export_merged
from ..io.batches import collate
from ..io.files import write_text_atomic
from ..optim import build_optimizer, resolve_lr
from .checkpoint import (
    TrainerState,
    adapter_digest,
    check_resumable,
    load_newest,
    resumable_checkpoints,
    save_checkpoint,
    save_final,
    trainable_state,
)
from .data import BatchPlan, build_task_data
from .engine import make_accelerator, optimizer_update
from .finite import check_final, check_finite
from .models import build_peft_model, count_parameters, load_base_model, load_tokenizer
from .recipe import OptimSection, Recipe, RecipeError
from .rundir import RunFolder, check_output_paths, explain_os_error
from .runlog import (
    MetricsLog,
    configure_logging,
    format_metrics,
    plot_curves,
    print_summary,
    run_hyperparameters,
    run_title,
)

logger = logging.getLogger("orthoft.train")


@dataclass
class StepResult:
    """One optimizer step, measured: losses averaged over micro-batches (``loss`` over processes too)."""

    loss: float
    reg_sum: torch.Tensor  # this process's summed penalty over the micro-batches (reduced when logged)
    grad_norm: float | None
    tokens: int  # non-padding tokens over all processes
    seconds: float


def build_recipe_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """``orthoft.optim.build_optimizer`` with the recipe's optimizer section."""
    kwargs = dict(optim.options)
    kwargs["weight_decay"] = optim.weight_decay
    # lr: auto -> the adapter method's measured default (and its AdamW one for the fallback group)
    lr, adamw_lr = resolve_lr(model, optim.name, optim.lr, optim.adamw_lr)
    if adamw_lr is not None and optim.name.lower() != "adamw":
        kwargs["adamw_lr"] = adamw_lr  # build_optimizer's adamw puts every tensor in one group
    try:
        return build_optimizer(model, optim.name, lr=lr, **kwargs)
    except TypeError as err:
        raise RecipeError(f"optim.options: {optim.options} not accepted by optimizer {optim.name!r}: {err}") from err


class TrainingRun:
    """One run of a recipe on this process; every process of a DDP run builds its own."""

    def __init__(self, recipe: Recipe, resume: bool = False, overwrite: bool = False) -> None:
        """Set up: accelerator, run folder, model with adapter, data, optimizer and schedule."""
        self.recipe = recipe
        self.wall_start = time.perf_counter()
        self.phases: dict[str, float] = {}  # seconds per phase, for the summary
        self.accelerator = make_accelerator(
            recipe.train.mixed_precision, log_with=recipe.train.report_to, project_dir=recipe.output_dir() / "trackers"
        )
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        configure_logging(logger, self.is_main)
        self.output_dir = recipe.output_dir()
        self.folder = RunFolder(self.output_dir, self.is_main)
        self.checkpoint: Path | None = None  # the one resumed from (set by start)
        try:
            self.candidates = self._prepare_folder(resume, overwrite)
            trackers = self.accelerator if recipe.train.report_to else None
            self.log = MetricsLog(self.output_dir / "metrics.jsonl", self.is_main, trackers)
            if trackers is not None:  # only now: an earlier run's tracker files were set aside above
                trackers.init_trackers("orthoft", config=run_hyperparameters(recipe))
            self._build_model_and_data()
            if not resume and self.is_main:  # a resume rewrites it only once its checkpoint has loaded
                self.save_recipe()
        except BaseException:
            self.folder.roll_back()  # an earlier run set aside by --overwrite comes back
            raise
        self.state = TrainerState(world_size=self.world)
        self.progress: Any = None

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the time spent in the block to ``phases[phase]``."""
        start = time.perf_counter()
        yield
        self.phases[phase] = round(self.phases.get(phase, 0.0) + time.perf_counter() - start, 2)

    def _prepare_folder(self, resume: bool, overwrite: bool) -> list[Path]:
        """Check the paths, then claim the folder; with ``resume``, the intact checkpoints (newest first)."""
        check_output_paths(self.recipe, replace=resume or overwrite)
        self.folder.claim(resume, overwrite)
        candidates = resumable_checkpoints(self.output_dir, logger.warning) if resume else []
        if resume:
            check_resumable(self.recipe, self.output_dir)
        self.accelerator.wait_for_everyone()
        return candidates

    def save_recipe(self) -> None:
        """``recipe.yaml``: the validated recipe, overrides applied (what --resume compares with)."""
        write_text_atomic(self.output_dir / "recipe.yaml", yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))

    def _build_model_and_data(self) -> None:
        recipe, accelerator = self.recipe, self.accelerator
        set_seed(recipe.train.seed)
        with self.timed("load_model"):
            self.tokenizer = load_tokenizer(recipe.model)
            device_map = {"": accelerator.local_process_index} if torch.cuda.is_available() else "cpu"
            base_model, compute_dtype = load_base_model(
                recipe.model, self.tokenizer, device_map=device_map, seed=recipe.train.seed
            )
            model = build_peft_model(
                base_model,
                recipe.adapter,
                recipe.model.task,
                recipe.model.name_or_path,
                recipe.train.gradient_checkpointing,
            )
        self.trainable_params, self.total_params = count_parameters(model)
        with self.timed("load_data"):
            try:
                self.data = build_task_data(recipe.data, self.tokenizer, recipe.model.task, recipe.train.seed)
            except UnicodeDecodeError as err:  # a binary or non-UTF-8 data file
                raise RecipeError(f"data.path: {recipe.data.path} is not UTF-8 text ({err}); convert it.") from err
        optimizer = build_recipe_optimizer(model, recipe.optim)
        self.scheduler = get_scheduler(
            recipe.train.lr_scheduler,
            optimizer,
            num_warmup_steps=recipe.train.warmup_steps,
            num_training_steps=recipe.train.max_steps,
        )
        # the scheduler is stepped by hand: Accelerate's wrapper would step it once per process
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.plan = BatchPlan(len(self.data.train), recipe.train.batch_size, self.world, recipe.train.seed)
        self._log_setup(compute_dtype)

    def _log_setup(self, compute_dtype: torch.dtype) -> None:
        recipe, data = self.recipe, self.data
        logger.info(
            "%s | %s %s | %d processes (%s), mixed precision %s, compute dtype %s",
            recipe.source_path,
            recipe.adapter.method,
            recipe.adapter.options,
            self.world,
            self.accelerator.device,
            self.accelerator.mixed_precision,
            compute_dtype,
        )
        logger.info(
            "trainable parameters: %s of %s (%.3f%%) | data: %s | train %d, eval %d examples",
            f"{self.trainable_params:,}",
            f"{self.total_params:,}",
            100 * self.trainable_params / max(self.total_params, 1),
            data.description,
            len(data.train),
            len(data.eval),
        )

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, examples: list[dict[str, Any]]) -> dict[str, float]:
        """The recipe's metrics on ``examples`` (every process takes part)."""
        recipe = self.recipe
        with self.timed("evaluate"):
            return evaluate_examples(
                self.unwrapped,
                examples,
                self.data.kind,
                recipe.metrics(),
                recipe.eval.batch_size or recipe.train.batch_size,
                self.tokenizer.pad_token_id,
                self.accelerator.device,
                max_batches=recipe.eval.max_batches,
                autocast=self.accelerator.autocast,
            )

    def sample(self, label: str, step: int) -> None:
        """Print and log a greedy continuation of ``eval.generate_prompt`` (causal LMs, main process)."""
        prompt = self.recipe.eval.generate_prompt
        if not (prompt and self.data.kind == "lm" and self.is_main):
            return
        with self.accelerator.autocast(), self.timed("generate"):
            text = generate_sample(
                self.unwrapped,
                self.tokenizer,
                prompt,
                self.recipe.eval.max_new_tokens,
                self.accelerator.device,
                chat=self.recipe.data.use_chat_template,
            )
        self.log.write({"event": "sample", "phase": label, "step": step, "prompt": prompt, "text": text})
        tqdm.write(f"--- sample ({label}) ---\n{prompt}{text}\n---")

    # ---- the steps -----------------------------------------------------------------------------
    def start(self) -> None:
        """Resume from the checkpoint, or evaluate the untrained adapter; then open the progress bar."""
        recipe = self.recipe
        if self.candidates:
            checkpoint, self.state = load_newest(
                self.candidates, self.accelerator, self.unwrapped, self.optimizer, self.scheduler, logger.warning
            )
            self.checkpoint = checkpoint
            if self.state.world_size != self.world:
                raise RecipeError(
                    f"--resume: {checkpoint} was written by {self.state.world_size} processes, this run has "
                    f"{self.world}; the data order depends on the process count, so resume with the same number "
                    "of processes."
                )
            self.log.truncate_after(self.state.step)
            if self.is_main:
                self.save_recipe()
            logger.info("resumed from %s (step %d of %d)", checkpoint, self.state.step, recipe.train.max_steps)
        elif recipe.eval.eval_before:
            before = self.evaluate(self.data.eval)
            self.log.write({"event": "eval", "phase": "before", "step": 0, **before})
            logger.info("before training: %s", format_metrics(before))
            self.sample("before", 0)
        self.model.train()
        self.progress = tqdm(
            total=recipe.train.max_steps,
            initial=self.state.step,
            disable=not self.is_main,
            desc="train",
            dynamic_ncols=True,
        )

    def train_step(self) -> StepResult:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        accelerator, state, train = self.accelerator, self.state, self.recipe.train
        step_start = time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)
        reg_sum = torch.zeros((), device=accelerator.device)
        tokens = 0
        accumulation = train.gradient_accumulation_steps
        for micro in range(accumulation):
            indices = self.plan.indices(state.micro_batch, accelerator.process_index)
            batch = collate([self.data.train[i] for i in indices], self.tokenizer.pad_token_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            state.micro_batch += 1
            tokens += int(batch["attention_mask"].sum())
            # gradients are all-reduced once per optimizer step, on the last micro-batch
            sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(self.model)
            with sync:
                with accelerator.autocast():
                    # includes the adapters' penalty: the PEFT model adds it in training (adapters.regularization)
                    loss = self.model(**batch).loss.float()
                with torch.no_grad():  # the same float32 value, for the log only; 0 for methods without a penalty
                    penalty = regularization_loss(self.unwrapped).float()
                reg_sum += penalty
                accelerator.backward(loss / accumulation)
            loss_sum += (loss - penalty).detach()  # the task loss, as logged before
        loss_value = float(accelerator.reduce(loss_sum / accumulation, "mean"))
        # before the update, so a NaN never reaches the weights; fp16's grad scaler skips inf gradients itself
        check_finite(self.unwrapped, loss_value, batch, state.step + 1, self.output_dir, self.accelerator)
        grad_norm = optimizer_update(accelerator, self.optimizer, self.scheduler, self.trainable, train.max_grad_norm)
        state.step += 1
        seconds = time.perf_counter() - step_start
        state.train_seconds += seconds
        global_tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))
        state.tokens_seen += global_tokens
        return StepResult(loss_value, reg_sum, grad_norm, global_tokens, seconds)

    def log_step(self, result: StepResult) -> None:
        """Progress bar every step; a ``train`` record every ``log_every`` steps and at the last."""
        state, train = self.state, self.recipe.train
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / result.seconds:.0f}")
        if state.step % train.log_every and state.step != train.max_steps:
            return
        accumulation = train.gradient_accumulation_steps
        record: dict[str, Any] = {
            "event": "train",
            "step": state.step,
            "epoch": round(self.plan.epoch_of(state.micro_batch), 4),
            "loss": result.loss,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": result.tokens / result.seconds,
            "step_time_s": result.seconds,
            "train_seconds": state.train_seconds,
            "reg_loss": float(self.accelerator.reduce(result.reg_sum / accumulation, "mean")),
        }
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm
        self.log.write(record)

    def run_step(self) -> None:
        """One optimizer step, then its log record, evaluation and checkpoint when they are due."""
        self.log_step(self.train_step())
        step, train = self.state.step, self.recipe.train
        if train.eval_every and step % train.eval_every == 0 and step < train.max_steps:
            metrics = self.evaluate(self.data.eval)
            self.log.write({"event": "eval", "step": step, **metrics})
            self.progress.write(f"step {step}: eval {format_metrics(metrics)}")
            if self.is_main:
                plot_curves(self.log.records(), self.output_dir / "curves.png", run_title(self.recipe))
        if train.save_every and step % train.save_every == 0:
            self.log.sync()  # the log up to this step is as durable as the checkpoint
            with self.timed("checkpoint"):
                save_checkpoint(
                    self.output_dir,
                    self.accelerator,
                    self.unwrapped,
                    self.optimizer,
                    self.scheduler,
                    self.state,
                    train.keep_checkpoints,
                )
            self.folder.commit()  # the new run has a checkpoint: an earlier run set aside by --overwrite goes

    # ---- after training ------------------------------------------------------------------------
    def save_final(self) -> tuple[list[str], float]:
        """Write ``final/``; (each process's adapter digest, largest weight difference between processes)."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        final = trainable_state(self.unwrapped)
        flat = torch.cat([final[k].float().reshape(-1) for k in sorted(final)]).to(accelerator.device)
        gathered = accelerator.gather(flat[None])  # (processes, n): DDP must have kept them identical
        spread = float((gathered - gathered[:1]).abs().max())
        digests = gather_object([adapter_digest(final)])
        if spread > 0:
            logger.warning("adapter weights differ across processes (max |diff| %.3g): DDP went out of sync", spread)
        check_final(final)  # never a NaN adapter as final/
        if self.is_main:
            save_final(self.unwrapped, final, self.output_dir / "final")
        self.folder.commit()
        return digests, spread

    def export(self) -> str:
        """Merged export via ``orthoft.export.export_merged``; the folder written."""
        export = self.recipe.export
        out_dir = Path(export.output_dir) if export.output_dir else self.output_dir / "merged"
        self.unwrapped.eval()
        with self.timed("export"):
            export_merged(
                self.unwrapped,
                out_dir,
                dtype=None if export.dtype == "auto" else export.dtype,
                quantization=export.quantization,
                tokenizer=self.tokenizer,
                overwrite=True,
            )
        return str(out_dir)

    def write_orthogonality(self) -> dict[str, Any]:
        """``orthogonality.json`` and its first lines on the console (main process)."""
        with self.timed("orthogonality"):
            report = orthogonality_report(self.unwrapped)
        write_text_atomic(self.output_dir / "orthogonality.json", json.dumps(report, indent=2))
        tqdm.write(format_orthogonality(report, limit=5))
        return report

    def finish(self) -> dict[str, Any]:
        """Final adapter, evaluation, diagnostics, export and ``summary.json``; returns the summary."""
        recipe, state = self.recipe, self.state
        self.progress.close()
        digests, spread = self.save_final()
        after = self.evaluate(self.data.eval)
        self.log.write({"event": "eval", "phase": "after", "step": state.step, **after})
        test_metrics = self.evaluate(self.data.test) if self.data.test else None
        self.sample("after", state.step)
        orthogonality = export_path = None
        if self.is_main:
            orthogonality = self.write_orthogonality() if recipe.eval.orthogonality else None
            export_path = self.export() if recipe.export.enabled else None
        before = next((r for r in self.log.records() if r.get("phase") == "before"), None) if self.is_main else None
        summary = {
            "recipe": recipe.source_path,
            "method": recipe.adapter.method,
            "optimizer": recipe.optim.name,
            "processes": self.world,
            "steps": state.step,
            "trainable_parameters": self.trainable_params,
            "total_parameters": self.total_params,
            "tokens_seen": state.tokens_seen,
            "train_seconds": round(state.train_seconds, 2),
            "wall_seconds": round(time.perf_counter() - self.wall_start, 2),
            "phase_seconds": self.phases,
            "before": {k: v for k, v in before.items() if k not in ("event", "phase", "step")} if before else None,
            "after": after,
            "test": test_metrics,
            "orthogonality": orthogonality["summary"] if orthogonality else None,
            "adapter_dir": str(self.output_dir / "final" / "adapter"),
            "adapter_sha256_per_rank": digests,
            "rank_max_abs_diff": spread,
            "export_path": export_path,
        }
        final_record = {k: summary[k] for k in ("after", "test", "rank_max_abs_diff")}
        self.log.write({"event": "final", "step": state.step, **final_record})
        if self.is_main:
            plot_curves(self.log.records(), self.output_dir / "curves.png", run_title(self.recipe))
            self.log.sync()
            write_text_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=2))
            print_summary(summary, self.output_dir)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return summary


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run a recipe; returns the summary written to ``summary.json`` (on every process)."""
    try:
        run = TrainingRun(recipe, resume=resume, overwrite=overwrite)
        try:
            run.start()
            while run.state.step < recipe.train.max_steps:
                run.run_step()
            return run.finish()
        except BaseException:
            if run.progress is not None:
                run.progress.close()  # the error goes on a line of its own, not after the bar
            run.folder.roll_back()  # before the first checkpoint: this run's files go, an earlier run comes back
            raise
    except OSError as err:  # a full, read-only or forbidden disk: one line with the path and the fix
        explained = explain_os_error(err, recipe.output_dir())
        if explained is None:
            raise
        raise explained from err


__all__ = ["StepResult", "TrainingRun", "build_recipe_optimizer", "train"]
