"""What a run reports: ``metrics.jsonl``, ``curves.png``, the console log and the closing summary."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..io.files import fsync_path, write_bytes_atomic, write_text_atomic
from .recipe import Recipe


class MetricsLog:
    """Append-only JSONL log, written by the main process only.

    Records are appended and flushed; :meth:`sync` (before every checkpoint and at the end) makes
    them durable, so after a power cut the log holds at least every record up to the latest
    checkpoint, and a resume, which rewrites it up to that step (atomically), replays the rest. A
    last line torn by the cut is dropped when read.
    """

    def __init__(self, path: Path, enabled: bool, trackers: Any = None) -> None:
        self.path, self.enabled = path, enabled
        self.trackers = trackers  # an Accelerator with report_to trackers: each record's numbers go there too

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        values = tracker_values(record)
        if self.trackers is not None and values:
            self.trackers.log(values, step=record["step"])

    def sync(self) -> None:
        """fsync the log (what a checkpoint written next may be resumed against)."""
        if self.enabled and self.path.is_file():
            fsync_path(self.path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as err:
                if number == len(lines) and not text.endswith("\n"):
                    break  # the last append was cut short (a kill or power cut): that record is replayed
                raise ValueError(
                    f"{self.path} line {number} is not JSON ({err}); delete or repair that line and rerun."
                ) from err
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (work a killed run did past its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step and r.get("event") != "final"]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Training loss (and evaluation loss) left, the evaluation metric right. False without matplotlib.

    ``title`` (see :func:`run_title`) heads the figure and is also the PNG's ``Title`` text field.
    """
    try:
        import matplotlib  # a test extra, not a dependency: curves are optional

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
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100, metadata={"Title": title} if title else None)
    plt.close(fig)
    write_bytes_atomic(path, image.getvalue())  # a kill mid-write never leaves a torn image
    return True


def format_metrics(metrics: dict[str, Any]) -> str:
    """``loss=2.3456, examples=32``: floats to four decimals."""
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def print_summary(summary: dict[str, Any], output_dir: Path) -> None:
    """The closing block of a run on stdout: metrics before/after, times, where the outputs are."""
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
        lines.append(f"test: {format_metrics(summary['test'])}")
    lines.append(f"time: {summary['wall_seconds']:.1f} s wall, {summary['train_seconds']:.1f} s in training steps")
    lines.append("  phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["phase_seconds"].items()))
    lines.append(f"adapter: {summary['adapter_dir']}")
    lines.append(f"export: {summary['export_path'] or 'not written (export.enabled is false)'}")
    lines.append(f"metrics: {output_dir / 'metrics.jsonl'}, curves: {output_dir / 'curves.png'}")
    print("\n".join(lines + ["=" * 60]), flush=True)


def configure_logging(logger: logging.Logger, is_main: bool) -> None:
    """``[orthoft] message`` lines on stderr: INFO on the main process, warnings only on the others."""
    handler = next((h for h in logger.handlers if h.get_name() == "orthoft-stderr"), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.set_name("orthoft-stderr")
        handler.setFormatter(logging.Formatter("[orthoft] %(message)s"))
        logger.addHandler(handler)
    # the stderr of now: a second run in one process (tests, notebooks) may have another one
    handler.stream = sys.stderr  # not setStream: that flushes the old stream, which may be closed
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``train``/``eval`` record as tracker scalars: ``train/loss``, ``eval/perplexity``, ..."""
    if record.get("event") not in ("train", "eval") or "step" not in record:
        return {}
    return {
        f"{record['event']}/{key}": float(value)
        for key, value in record.items()
        if key not in ("step", "event") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def run_hyperparameters(recipe: Recipe) -> dict[str, str | int | float | bool]:
    """Method, model, data and the key training values as flat scalars (tracker config, the curves' title)."""
    values: dict[str, Any] = {
        "recipe": Path(recipe.source_path).stem if recipe.source_path else "run",
        "method": recipe.adapter.method,
        "model": recipe.model.name_or_path,
        "quantization": "4-bit" if recipe.model.load_in_4bit else "8-bit" if recipe.model.load_in_8bit else "none",
        "data": recipe.data.path or recipe.data.source or "",
        "optimizer": recipe.optim.name,
        "lr": recipe.optim.lr,
        "weight_decay": recipe.optim.weight_decay,
        "batch_size": recipe.train.batch_size,
        "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
        "max_steps": recipe.train.max_steps,
        "lr_scheduler": recipe.train.lr_scheduler,
        "seed": recipe.train.seed,
    }
    for key, value in recipe.adapter.options.items():
        if isinstance(value, (list, tuple, set)):
            value = ",".join(str(v) for v in value)
        if isinstance(value, (str, int, float, bool)):  # nested options (dicts) stay in recipe.yaml
            values[f"adapter.{key}"] = value
    return values


def run_title(recipe: Recipe) -> str:
    """Lines naming the run: recipe, method, model, data; adapter options; optimizer, lr, batch, steps, seed."""
    hp = run_hyperparameters(recipe)
    quantized = "" if hp["quantization"] == "none" else f" ({hp['quantization']})"
    options = ", ".join(
        f"{key.removeprefix('adapter.')}={value}"
        for key, value in hp.items()
        # module lists (target_modules: [...], modules_to_save) would crowd the title; recipe.yaml has them
        if key.startswith("adapter.") and key != "adapter.modules_to_save" and len(str(value)) <= 20
    )
    batch = f"{hp['batch_size']}x{hp['gradient_accumulation_steps']}"
    lines = [
        f"{hp['recipe']}: {hp['method']} on {hp['model']}{quantized}, data {hp['data']}",
        f"{hp['method']}: {options}" if options else "",
        f"{hp['optimizer']} lr={hp['lr']:g}, batch {batch}, {hp['max_steps']} steps ({hp['lr_scheduler']}), "
        f"seed {hp['seed']}",
    ]
    return "\n".join(line for line in lines if line)


__all__ = [
    "MetricsLog",
    "configure_logging",
    "format_metrics",
    "plot_curves",
    "print_summary",
    "run_hyperparameters",
    "run_title",
    "tracker_values",
]
