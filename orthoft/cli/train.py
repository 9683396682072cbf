"""``orthoft train RECIPE.yaml``: fine-tune with a YAML recipe (see recipes/ and orthoft/training/recipe.py)."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe path and ``--override``, ``--resume``, ``--overwrite``, ``--check``."""
    parser.add_argument("recipe", help="recipe YAML file, e.g. recipes/smollm2-qoft.yaml")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change one recipe value (YAML syntax), e.g. --override train.max_steps=10; repeatable",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier run in train.output_dir first")
    parser.add_argument("--check", action="store_true", help="only validate the recipe and print it")


def run(args: argparse.Namespace) -> int:
    """Validate the recipe, then print it (``--check``) or train; RecipeError/FileExistsError reach ``main``."""
    import yaml

    from ..training.recipe import load_recipe

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe = load_recipe(args.recipe, args.override)
    if args.check:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        print(f"{args.recipe}: valid")
        return 0
    from ..training.loop import train

    train(recipe, resume=args.resume, overwrite=args.overwrite)
    return 0


__all__ = ["add_arguments", "run"]
