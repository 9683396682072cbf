"""``orthoft recipes [NAME]``: the recipes shipped with orthoft.

Without NAME: one block per recipe (name, the command that runs it, the first sentence of its
description). With NAME: the recipe file itself on stdout, e.g. ``orthoft recipes smollm2-qoft >
my.yaml`` to start a recipe of one's own; ``--path`` prints where it is instead.
"""

from __future__ import annotations

import argparse
import textwrap


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """An optional recipe NAME and ``--path``."""
    parser.add_argument("name", nargs="?", help="a shipped recipe: print its YAML (e.g. smollm2-qoft)")
    parser.add_argument("--path", action="store_true", help="print the file path(s) instead of the contents")


def run(args: argparse.Namespace) -> int:
    """List the shipped recipes, or print one (its text or its path)."""
    from ..io.recipes import find_recipe, recipe_info, recipes_dir, shipped_recipes

    if args.name:
        path = find_recipe(args.name)
        print(path if args.path else path.read_text(encoding="utf-8"), end="\n" if args.path else "")
        return 0
    shipped = shipped_recipes()
    if args.path:
        print("\n".join(str(path) for path in shipped.values()))
        return 0
    blocks = []
    for name, path in shipped.items():
        info = recipe_info(name, path)
        wrapped = textwrap.fill(info.description, width=96, initial_indent="    ", subsequent_indent="    ")
        blocks.append(f"{name}\n    run: {info.command} {name}\n{wrapped}")
    print("\n".join(blocks))
    print(
        f"\n{len(shipped)} recipes in {recipes_dir()}. `orthoft recipes NAME > my.yaml` copies one to edit; "
        "`orthoft train my.yaml` runs your copy."
    )
    return 0


__all__ = ["add_arguments", "run"]
