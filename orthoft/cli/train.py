"""``orthoft train RECIPE``: fine-tune with a YAML recipe file or shipped recipe name (``orthoft recipes``)."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe path and ``--override``, ``--resume``, ``--overwrite``, ``--check``."""
    parser.add_argument("recipe", help="recipe YAML file, or the name of a shipped one (orthoft recipes): smollm2-qoft")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change one recipe value (YAML syntax), e.g. --override train.max_steps=10; repeatable",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in train.output_dir (kept until the new run's first checkpoint)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the recipe without training: paths, data file, and the model with its adapter built "
        "from the config on the meta device (no weights); print it",
    )


def run(args: argparse.Namespace) -> int:
    """Validate the recipe, then check and print it (``--check``) or train; user errors reach ``main``."""
    import yaml

    from ..training.recipe import load_recipe

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe = load_recipe(args.recipe, args.override)
    if args.check:
        from ..training.preflight import check_recipe

        # paths, data file, tokenizer, model and adapter on the meta device
        checked = check_recipe(recipe, replace=args.overwrite or args.resume)
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        print("\n".join(checked))
        print(f"{args.recipe}: valid")
        return 0
    from ..training.loop import train

    train(recipe, resume=args.resume, overwrite=args.overwrite)
    return 0


__all__ = ["add_arguments", "run"]
