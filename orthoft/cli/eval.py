"""``orthoft eval``: task metrics and orthogonality diagnostics of a trained adapter.

TARGET is a run folder written by ``orthoft train`` (it holds ``recipe.yaml`` and
``final/adapter``) or a recipe file. The recipe says which base model, data and metrics to use;
the results are printed and written as JSON (default ``<adapter>/../eval_<split>.json``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Evaluate a trained adapter. TARGET is a run folder written by `orthoft train` (it holds "
    "recipe.yaml and final/adapter) or a recipe file (then --adapter, default <output_dir>/final/adapter)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """TARGET, the adapter folder, the split, recipe overrides, the output file and what to compute."""
    parser.description = DESCRIPTION
    parser.add_argument("target", help="run folder or recipe YAML")
    parser.add_argument("--adapter", help="adapter folder (save_pretrained output); default: the run's final adapter")
    parser.add_argument("--split", choices=("eval", "test"), default="eval", help="which split to score")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--output", help="JSON file for the results (default: <adapter>/../eval_<split>.json)")
    parser.add_argument("--no-metrics", action="store_true", help="only the orthogonality diagnostics")
    parser.add_argument("--no-orthogonality", action="store_true", help="only the task metrics")
    parser.add_argument("--batch-size", type=int, default=None)


def adapter_folder(target: Path, adapter: str | None, recipe_output_dir: Path) -> Path:
    """``--adapter``, else the run folder's ``final/adapter``, else the recipe's ``<output_dir>/final/adapter``.

    Its config and weights header are checked here, so a missing, corrupt or truncated file is
    named before the base model loads.
    """
    from ..io.adapter_files import check_adapter_folder

    if adapter:
        adapter_dir = Path(adapter)
    elif target.is_dir():
        adapter_dir = target / "final" / "adapter"
    else:
        adapter_dir = recipe_output_dir / "final" / "adapter"
    check_adapter_folder(adapter_dir)
    return adapter_dir


def output_file(output: str | None, adapter_dir: Path, split: str) -> Path:
    """Where the JSON goes (``--output``, default ``<adapter>/../eval_<split>.json``); its folder is made now."""
    path = Path(output) if output else adapter_dir.parent / f"eval_{split}.json"
    if path.is_dir():
        raise IsADirectoryError(
            f"--output {path} is a folder. Fix: pass a file path, e.g. --output {path / f'eval_{split}.json'}."
        )
    path.parent.mkdir(parents=True, exist_ok=True)  # a read-only or full disk fails here, before any work
    return path


def refuse_non_finite(model: Any, adapter_dir: Path) -> None:
    """A NaN/inf adapter has no meaningful metrics or angles: one message naming the first bad tensor."""
    from ..evaluation.orthogonality import non_finite_adapter_tensors

    bad = non_finite_adapter_tensors(model)
    if bad:
        raise ValueError(
            f"adapter {adapter_dir} is non-finite: {len(bad)} tensor(s) hold NaN/inf, first {bad[0]}; its metrics "
            "and rotation angles would be meaningless, so nothing was written. Fix: training diverged: evaluate an "
            "earlier checkpoint (--adapter RUN/checkpoints/step-N/adapter) or retrain with a lower learning rate."
        )


def run(args: argparse.Namespace) -> int:
    """Load the recipe and the trained adapter, compute what was asked for, print it and write the JSON."""
    import json

    import torch

    from ..evaluation import format_orthogonality, orthogonality_report
    from ..io.adapter_files import adapter_load_errors
    from ..io.files import write_text_atomic
    from ..training.models import load_trained
    from ..training.recipe import load_recipe

    target = Path(args.target)
    recipe = load_recipe(target / "recipe.yaml" if target.is_dir() else target, args.override)
    adapter_dir = adapter_folder(target, args.adapter, recipe.output_dir())
    output = output_file(args.output, adapter_dir, args.split)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_map = {"": 0} if device == "cuda" else "cpu"
    base = f"{recipe.model.name_or_path!r} (model section of {recipe.source_path})"
    fix = "evaluate it with the recipe that trained it (RUN/recipe.yaml) and no --override of model.*"
    with adapter_load_errors(adapter_dir, base, fix=fix):
        model, tokenizer = load_trained(recipe.model, adapter_dir, device_map=device_map, seed=recipe.train.seed)
    refuse_non_finite(model, adapter_dir)
    if not (recipe.model.load_in_4bit or recipe.model.load_in_8bit):
        model.to(device)
    results: dict[str, Any] = {"adapter": str(adapter_dir), "split": args.split}
    if not args.no_metrics:
        results["metrics"] = task_metrics(recipe, model, tokenizer, args.split, args.batch_size, device)
    if not args.no_orthogonality:
        results["orthogonality"] = orthogonality_report(model)
        print(format_orthogonality(results["orthogonality"]))
    write_text_atomic(output, json.dumps(results, indent=2))  # an earlier result stays whole if this fails
    print(f"wrote {output}")
    return 0


def task_metrics(
    recipe: Any, model: Any, tokenizer: Any, split: str, batch_size: int | None, device: str
) -> dict[str, float]:
    """The recipe's metrics on ``split`` of its data (printed on one line)."""
    from ..evaluation import evaluate_examples, format_values
    from ..training.data import build_task_data

    data = build_task_data(recipe.data, tokenizer, recipe.model.task, recipe.train.seed)
    examples = data.test if split == "test" else data.eval
    if examples is None:
        raise ValueError(f"{data.description} has no test split; use --split eval.")
    batch_size = batch_size or recipe.eval.batch_size or recipe.train.batch_size
    metrics = evaluate_examples(
        model, examples, data.kind, recipe.metrics(), batch_size, tokenizer.pad_token_id, device
    )
    print(f"{split} metrics: " + format_values(metrics))
    return metrics
