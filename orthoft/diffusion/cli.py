"""``orthoft diffusion``: run a diffusion recipe (tiny digits pipeline, or any saved base pipeline)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``diffusion`` with ``train`` (DreamBooth recipe) and ``concepts`` (Orthogonal Adaptation)."""
    parser = subparsers.add_parser("diffusion", help="orthogonal adapters in diffusers pipelines")
    commands = parser.add_subparsers(dest="diffusion_command", required=True)
    for name, help_text in (
        ("train", "DreamBooth fine-tuning of an adapter: loss before/after, sample grid, merged pipeline"),
        ("concepts", "Orthogonal Adaptation: train concept adapters, merge them, measure interference"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("recipe", help="recipe YAML, e.g. recipes/diffusion-digits-oft.yaml")
        command.add_argument("--output-dir", help="overrides the recipe's output_dir")
        command.add_argument("--base", help="a saved base pipeline folder to use instead of pre-training the tiny one")
        command.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    import json

    from .digits import run_concepts_recipe, run_digits_recipe
    from .recipe import load_recipe

    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    if args.base:
        overrides["base"] = args.base
    recipe = load_recipe(args.recipe, **overrides)
    runner = run_digits_recipe if args.diffusion_command == "train" else run_concepts_recipe
    report = runner(recipe)
    print(json.dumps(report, indent=2))
    return 0
