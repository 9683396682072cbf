"""``orthoft train RECIPE.yaml``: Accelerate training from validated YAML recipes.

Modules: ``recipe`` (schema and validation), ``models`` (base models, 4/8-bit, adapters),
``data`` (tokenized splits and the deterministic batch order), ``loop`` (the training loop,
checkpoints, exact resume). Run on several processes with ``accelerate launch`` or ``torchrun``.
"""

from __future__ import annotations

import argparse
import os

from .recipe import Recipe, RecipeError, load_recipe


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="Fine-tune with a YAML recipe (one GPU, CPU, or several processes via accelerate launch/torchrun).",
        description="Fine-tune with a YAML recipe; see recipes/ for examples and orthoft/training/recipe.py for keys.",
    )
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
    parser.set_defaults(func=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    import yaml

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        recipe = load_recipe(args.recipe, args.override)
    except RecipeError as err:
        raise SystemExit(f"orthoft train: {err}") from None
    if args.check:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        print(f"{args.recipe}: valid")
        return 0
    from .loop import train

    try:
        train(recipe, resume=args.resume, overwrite=args.overwrite)
    except (RecipeError, FileExistsError) as err:
        raise SystemExit(f"orthoft train: {err}") from None
    return 0


__all__ = ["Recipe", "RecipeError", "add_parser", "load_recipe", "run_train_command"]
