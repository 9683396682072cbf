"""``orthoft diffusion``: run a diffusion recipe (tiny digits pipeline, or any saved base pipeline).

``train`` runs DreamBooth fine-tuning of an adapter, ``concepts`` runs Orthogonal Adaptation; both
print the run's report as JSON.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # org/name: left to diffusers (hub or cache)
SUBCOMMANDS: dict[str, str] = {
    "train": "DreamBooth fine-tuning of an adapter: loss before/after, sample grid, merged pipeline",
    "concepts": "Orthogonal Adaptation: train concept adapters, merge them, measure interference",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` (DreamBooth recipe) and ``concepts`` (Orthogonal Adaptation) sub-subcommands."""
    commands = parser.add_subparsers(dest="diffusion_command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        command.add_argument("recipe", help="recipe YAML, e.g. recipes/diffusion-digits-oft.yaml")
        command.add_argument("--output-dir", help="overrides the recipe's output_dir")
        command.add_argument("--base", help="a saved base pipeline folder to use instead of pre-training the tiny one")


def check_paths(recipe: Any) -> None:
    """Before minutes of pre-training: the base pipeline folder and the output folder must make sense."""
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(
            f"output_dir {out} is a file, not a folder. Fix: pass --output-dir a folder (new or an earlier run's)."
        )
    base = recipe.base.pretrained
    if not base:
        return
    folder = Path(base).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"base pipeline {folder} has no model_index.json, so it is no saved diffusers pipeline. Fix: pass "
                "--base a folder written by DiffusionPipeline.save_pretrained (e.g. RUN/merged_pipeline), or drop "
                "--base to pre-train the tiny digits pipeline."
            )
    elif folder.exists() or not _HUB_ID.match(base):
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"base pipeline folder {folder} {state}. Fix: pass --base a folder written by "
            "DiffusionPipeline.save_pretrained, a hub id (org/name), or drop --base to pre-train the tiny one."
        )


def run(args: argparse.Namespace) -> int:
    """Load the recipe (with the flags' overrides), run it and print its report as JSON."""
    import json

    from ..diffusion.digits import run_concepts_recipe, run_digits_recipe
    from ..diffusion.recipe import load_recipe

    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    if args.base:
        overrides["base"] = args.base
    recipe = load_recipe(args.recipe, **overrides)
    check_paths(recipe)
    runner = run_digits_recipe if args.diffusion_command == "train" else run_concepts_recipe
    report = runner(recipe)
    print(json.dumps(report, indent=2))
    return 0


__all__ = ["SUBCOMMANDS", "add_arguments", "check_paths", "run"]
