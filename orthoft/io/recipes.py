"""The recipes shipped with orthoft (package data in ``orthoft/recipes``), found by name or by path.

``orthoft train smollm2-qoft`` and ``orthoft train path/to/my.yaml`` both work: :func:`find_recipe`
takes an existing file as it is and otherwise looks the name up among :func:`shipped_recipes`
(``smollm2-qoft``, ``smollm2-qoft.yaml``, ``gpu/qwen2.5-7b-metamath-qoft`` and
``recipes/smollm2-qoft.yaml`` all name a shipped file), so a wheel install runs the same recipes as
a checkout. ``orthoft recipes`` lists them; in a checkout, ``recipes/`` points to the same folder.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePath

import yaml

from .schema import RecipeError

SUFFIXES = (".yaml", ".yml")


@dataclass
class RecipeInfo:
    """A shipped recipe as ``orthoft recipes`` shows it."""

    name: str
    path: Path
    command: str  # how to run it: ``orthoft train``, ``orthoft diffusion train`` or ``orthoft diffusion concepts``
    description: str


def recipes_dir() -> Path:
    """The folder of the shipped recipes (``orthoft/recipes`` in the installed package)."""
    # the top package is already imported (orthoft.io sits in it), so this only reads its location;
    # every install orthoft supports (wheel, editable, checkout) keeps it as a plain folder
    return Path(str(resources.files("orthoft").joinpath("recipes")))


def shipped_recipes() -> dict[str, Path]:
    """Name (file stem) -> file of every shipped recipe, top folder first, then subfolders (``gpu/``)."""
    root = recipes_dir()
    files = [p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    found: dict[str, Path] = {}
    for path in sorted(files, key=lambda p: (len(p.relative_to(root).parts), str(p.relative_to(root)))):
        found.setdefault(path.stem, path)  # stems are unique (tests/test_packaging.py); the first one wins
    return found


def find_recipe(name_or_path: str | Path) -> Path:
    """An existing recipe file as given, else the shipped recipe of that name; RecipeError naming both otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    wanted = _relative_name(PurePath(name_or_path))
    root = recipes_dir()
    for name, file in shipped.items():
        if wanted in (name, _relative_name(file.relative_to(root))):
            return file
    close = difflib.get_close_matches(wanted.rpartition("/")[2], list(shipped), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise RecipeError(
        f"Recipe file {path} does not exist, and no recipe of that name ships with orthoft.{hint} "
        f"`orthoft recipes` lists the shipped ones ({len(shipped)}, in {root}); give a path to use your own YAML file."
    )


def recipe_info(name: str, path: Path) -> RecipeInfo:
    """Name, file, the command that runs it and its description's first sentence."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "concepts" in raw:
        command = "orthoft diffusion concepts"
    elif "base" in raw or "subject" in raw:  # the sections of a diffusion recipe (orthoft/diffusion/recipe.py)
        command = "orthoft diffusion train"
    else:
        command = "orthoft train"
    text = " ".join(str(raw.get("description", "")).split())
    first, dot, _ = text.partition(". ")
    return RecipeInfo(name=name, path=path, command=command, description=first + ("." if dot else ""))


def _relative_name(path: PurePath) -> str:
    """``recipes/gpu/x.yaml`` -> ``gpu/x``: a name relative to the recipes folder, without suffix."""
    parts = list(path.parts)
    if len(parts) > 1 and parts[0] == "recipes":
        parts = parts[1:]
    if parts and PurePath(parts[-1]).suffix in SUFFIXES:
        parts[-1] = PurePath(parts[-1]).stem
    return "/".join(parts)


__all__ = ["SUFFIXES", "RecipeInfo", "find_recipe", "recipe_info", "recipes_dir", "shipped_recipes"]
