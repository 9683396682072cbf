"""``orthoft diffusion``: run a diffusion recipe (tiny digits pipeline, or any saved base pipeline).

``train`` runs DreamBooth fine-tuning of an adapter, ``concepts`` runs Orthogonal Adaptation; both
print the run's report as JSON.
"""

from __future__ import annotations

import argparse

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


def run(args: argparse.Namespace) -> int:
    """Load the recipe (with the flags' overrides), run it and print its report as JSON."""
    import json

    from ..diffusion.digits import run_concepts_recipe, run_digits_recipe
    from ..diffusion.recipe import load_recipe

    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    if args.base:
        overrides["base"] = args.base
    recipe = load_recipe(args.recipe, **overrides)
    runner = run_digits_recipe if args.diffusion_command == "train" else run_concepts_recipe
    report = runner(recipe)
    print(json.dumps(report, indent=2))
    return 0


__all__ = ["SUBCOMMANDS", "add_arguments", "run"]
