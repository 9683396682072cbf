"""What a run reports: ``metrics.jsonl``, ``curves.png``, the console log and the closing summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any


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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
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
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[orthoft] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False


__all__ = ["MetricsLog", "configure_logging", "format_metrics", "plot_curves", "print_summary"]
