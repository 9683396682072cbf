"""``orthoft merge``: combine saved orthoft adapters of one method into one adapter folder (or a merged model)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MERGE_INFO_FILE = "orthoft_merge.json"
MERGED_NAME = "merged"
# default weights per combination type: a mean, except where the product or the projected sum is the point
SUM_BY_DEFAULT = ("compose", "projection")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``orthoft merge``."""
    parser.description = (
        "Load BASE and each ADAPTER (all of one orthoft method), combine them into one adapter with --method "
        "(see docs/merging.md) and write it to OUT atomically: an adapter folder that PeftModel.from_pretrained "
        "loads, or with --export a plain Hugging Face model with the merged adapter folded in."
    )
    parser.add_argument(
        "--base", help="base model folder or hub id (default: the first adapter's base_model_name_or_path)"
    )
    parser.add_argument(
        "--adapter", action="append", required=True, help="saved orthoft adapter folder; repeat, in order"
    )
    parser.add_argument(
        "--weights",
        type=float,
        nargs="+",
        help="one weight per adapter (default: 1/n each for lie, fisher, linear; 1 each for compose, projection)",
    )
    parser.add_argument(
        "--method",
        choices=("lie", "compose", "fisher", "projection", "linear"),
        default="lie",
        help="combination type (default lie)",
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--export", action="store_true", help="write a merged plain Hugging Face model instead")
    parser.add_argument(
        "--fisher-data",
        action="append",
        help="fisher only: a training recipe (YAML) per adapter, in adapter order; its training data feeds "
        "the Fisher estimate",
    )
    parser.add_argument(
        "--fisher-examples", type=int, default=32, help="examples per adapter for the Fisher estimate (default 32)"
    )
    parser.add_argument(
        "--modules-to-save-from",
        help="adapter folder whose modules_to_save copies (e.g. a task head) the merged adapter takes",
    )
    parser.add_argument("--load-in-4bit", action="store_true", help="load BASE in 4-bit nf4 (as it was trained)")
    parser.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if an earlier merge or export wrote it")


def default_weights(method: str, count: int) -> list[float]:
    """The weights used when ``--weights`` is not given."""
    return [1.0] * count if method in SUM_BY_DEFAULT else [1.0 / count] * count


def _check_arguments(args: argparse.Namespace) -> list[float]:
    weights = args.weights or default_weights(args.method, len(args.adapter))
    if len(weights) != len(args.adapter):
        raise ValueError(
            f"--weights gave {len(weights)} numbers for {len(args.adapter)} adapters. Fix: one weight per --adapter."
        )
    if args.method == "fisher" and len(args.fisher_data or []) != len(args.adapter):
        raise ValueError(
            f"--method fisher needs one --fisher-data recipe per adapter ({len(args.adapter)}), got "
            f"{len(args.fisher_data or [])}. Fix: pass --fisher-data RECIPE.yaml for each --adapter, in order."
        )
    if args.method != "fisher" and args.fisher_data:
        raise ValueError("--fisher-data is only used by --method fisher. Fix: drop it or pass --method fisher.")
    if args.fisher_examples < 1:
        raise ValueError(f"--fisher-examples must be >= 1, got {args.fisher_examples}.")
    if args.modules_to_save_from is not None and args.modules_to_save_from not in args.adapter:
        raise ValueError(
            f"--modules-to-save-from {args.modules_to_save_from} is not one of the --adapter folders {args.adapter}. "
            "Fix: repeat one of them exactly."
        )
    return weights


def _check_out(out: Path, args: argparse.Namespace) -> None:
    """Refuse an OUT that would replace an input, the working directory or a folder no merge/export wrote."""
    from ..export.destination import protected_inputs
    from ..export.report import EXPORT_INFO_FILE

    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ValueError(f"--out {out} is (a parent of) the working directory. Fix: pass a new folder.")
    for what, folder in protected_inputs(args.base, args.adapter):
        folder = folder.resolve()
        if folder == real or real in folder.parents:
            raise ValueError(f"--out {out} is or holds {what} {folder}. Fix: pass a new folder.")
    if not out.exists():
        return
    if not args.overwrite:
        raise FileExistsError(f"--out {out} already exists. Fix: choose a new folder, or pass --overwrite.")
    written = (out / MERGE_INFO_FILE).is_file() or (out / EXPORT_INFO_FILE).is_file()
    if not out.is_dir() or not (written or not any(out.iterdir())):
        raise ValueError(
            f"--out {out} was not written by orthoft merge/export (no {MERGE_INFO_FILE}); --overwrite only replaces "
            "such folders. Fix: pass a new folder, or move that one away yourself."
        )


def fisher_batches(recipe_path: str, examples: int, device: Any) -> list[dict[str, Any]]:
    """Batches of one training example each from a recipe's data (the per-example empirical Fisher)."""
    from ..io.batches import collate
    from ..training.data import build_task_data
    from ..training.models import load_tokenizer
    from ..training.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model)
    data = build_task_data(recipe.data, tokenizer, recipe.model.task, recipe.train.seed)
    rows = data.train[:examples]
    return [{k: v.to(device) for k, v in collate([row], tokenizer.pad_token_id).items()} for row in rows]


def _save_adapter(peft_model: Any, out: Path, info: dict[str, Any], overwrite: bool) -> None:
    from ..io.files import staged_directory

    with staged_directory(out, overwrite=overwrite) as staging:
        peft_model.save_pretrained(str(staging), selected_adapters=[MERGED_NAME])
        nested = staging / MERGED_NAME  # PEFT writes a named adapter into a subfolder: lift it to OUT itself
        for child in nested.iterdir():
            child.rename(staging / child.name)
        nested.rmdir()
        (staging / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    """Check the arguments and OUT, load, merge, write."""
    import torch

    from ..adapters import estimate_fisher
    from ..export import export_merged, load_for_export
    from ..export.report import format_error
    from ..version import __version__

    weights = _check_arguments(args)
    out = Path(args.out).absolute()
    _check_out(out, args)
    peft_model, names = load_for_export(args.base, args.adapter, args.load_in_4bit, args.device)
    fisher = None
    if args.method == "fisher":
        device = next(peft_model.parameters()).device
        fisher = {
            name: estimate_fisher(peft_model, name, fisher_batches(recipe, args.fisher_examples, device))
            for name, recipe in zip(names, args.fisher_data)
        }
    heads = names[args.adapter.index(args.modules_to_save_from)] if args.modules_to_save_from else None
    peft_model.add_weighted_adapter(
        names, weights, MERGED_NAME, combination_type=args.method, fisher=fisher, modules_to_save_from=heads
    )
    if args.export:
        with torch.no_grad():
            report = export_merged(
                peft_model, out, adapter_names=[MERGED_NAME], base_name_or_path=args.base, overwrite=args.overwrite
            )
        print(f"wrote merged model {report.out_dir}")
        print(f"merge error (float32 merge vs adapter model): {format_error(report.merge_error)}")
        return 0
    info = {
        "method": args.method,
        "adapters": [str(Path(a).absolute()) for a in args.adapter],
        "weights": weights,
        "fisher_data": args.fisher_data,
        "orthoft_version": __version__,
    }
    _save_adapter(peft_model, out, info, args.overwrite)
    print(f"wrote adapter {out} ({args.method} of {len(names)} adapters, weights {weights})")
    return 0


__all__ = ["MERGE_INFO_FILE", "add_arguments", "default_weights", "fisher_batches", "run"]
