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
    """``--adapter``, else the run folder's ``final/adapter``, else the recipe's ``<output_dir>/final/adapter``."""
    if adapter:
        adapter_dir = Path(adapter)
    elif target.is_dir():
        adapter_dir = target / "final" / "adapter"
    else:
        adapter_dir = recipe_output_dir / "final" / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} holds no adapter_config.json. Pass --adapter with a folder written by "
            "`orthoft train` (RUN/final/adapter or RUN/checkpoints/step-N/adapter)."
        )
    return adapter_dir


def run(args: argparse.Namespace) -> int:
    """Load the recipe and the trained adapter, compute what was asked for, print it and write the JSON."""
    import json

    import torch

    from ..evaluation import format_orthogonality, orthogonality_report
    from ..training.models import load_trained
    from ..training.recipe import load_recipe

    target = Path(args.target)
    recipe = load_recipe(target / "recipe.yaml" if target.is_dir() else target, args.override)
    adapter_dir = adapter_folder(target, args.adapter, recipe.output_dir())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_map = {"": 0} if device == "cuda" else "cpu"
    model, tokenizer = load_trained(recipe.model, adapter_dir, device_map=device_map, seed=recipe.train.seed)
    if not (recipe.model.load_in_4bit or recipe.model.load_in_8bit):
        model.to(device)
    results: dict[str, Any] = {"adapter": str(adapter_dir), "split": args.split}
    if not args.no_metrics:
        results["metrics"] = task_metrics(recipe, model, tokenizer, args.split, args.batch_size, device)
    if not args.no_orthogonality:
        results["orthogonality"] = orthogonality_report(model)
        print(format_orthogonality(results["orthogonality"]))
    output = Path(args.output) if args.output else adapter_dir.parent / f"eval_{args.split}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
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
