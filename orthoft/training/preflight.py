"""``orthoft train --check``: everything about a recipe that can be checked without training or loading weights.

Beyond the schema (types, ranges, finite learning rates, ``block_size: 0``), :func:`check_recipe`
checks that ``train.output_dir`` and ``export.output_dir`` cannot replace a user's files, that a
local data file exists, that the tokenizer loads, and builds the model from its config on the meta
device (no weights are read or allocated) with the recipe's adapter on it, so target modules that
match nothing and block sizes that do not divide a layer's width fail here with the adapters' own
messages (which name the layer and the nearest valid sizes) instead of minutes into a run.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from ..adapters import OrthoLayer
from .models import (
    auto_model_class,
    build_peft_model,
    config_from_recipe,
    count_parameters,
    load_tokenizer,
)
from .recipe import Recipe, RecipeError
from .rundir import check_output_paths


def check_data_path(recipe: Recipe) -> str | None:
    """RecipeError when a local data file is missing; a line saying what was checked (None: nothing local)."""
    path, source = recipe.data.path, recipe.data.source
    if not path or source == "hf":
        return None  # a datasets id is resolved (and downloaded) only when the run starts
    file = Path(path).expanduser()
    if not file.is_file():
        what = "a folder, not a file" if file.is_dir() else "missing"
        raise RecipeError(f"data.path: {path} is {what}. Fix: point data.path at the data file.")
    with file.open("rb") as handle:
        head = handle.read(1 << 20)
    try:  # the first MiB; an incremental decoder accepts a character cut at the end of it
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as err:
        raise RecipeError(f"data.path: {path} is not UTF-8 text ({err}); convert it.") from err
    return f"data.path {path}: found, UTF-8 ({file.stat().st_size:,} bytes)"


def check_model(recipe: Recipe) -> str:
    """Build the model on the meta device and apply the adapter; a line describing both. RecipeError on a mismatch."""
    from accelerate import init_empty_weights

    section = recipe.model
    tokenizer = load_tokenizer(section)
    config = config_from_recipe(section, tokenizer)
    with init_empty_weights():  # parameters on the meta device: shapes only, nothing read or allocated
        base = auto_model_class(section.task).from_config(config)
    try:  # build_peft_model checks the target module names first
        model = build_peft_model(base, recipe.adapter, section.task, section.name_or_path, False)
    except (RuntimeError, NotImplementedError) as err:
        if "meta" not in str(err):
            raise
        # a method that factorizes the base weights (CLOVER) needs them; its target names were checked above
        return (
            f"model {section.name_or_path} ({config.model_type}): target modules match; {recipe.adapter.method} "
            "factorizes the weights, so its layers are only built when the run starts"
        )
    trainable, total = count_parameters(model)
    layers = sum(1 for module in model.modules() if isinstance(module, OrthoLayer))
    return (
        f"model {section.name_or_path} ({config.model_type}, {total:,} parameters) built without weights; "
        f"adapter {recipe.adapter.method} on {layers} layers, {trainable:,} trainable parameters"
    )


def check_recipe(recipe: Recipe, replace: bool = False) -> list[str]:
    """Every check above, in order of cost; lines saying what was checked. RecipeError on the first problem.

    ``replace``: the run would be given ``--overwrite`` or ``--resume`` (an existing export may be replaced).
    """
    check_output_paths(recipe, replace)
    lines = [f"train.output_dir {recipe.output_dir()}: a folder of its own (no input in it, not the working directory)"]
    if recipe.export.enabled:
        lines.append(f"export: to {recipe.export.output_dir or recipe.output_dir() / 'merged'}")
    data = check_data_path(recipe)
    if data:
        lines.append(data)
    lines.append(check_model(recipe))
    return lines


__all__ = ["check_data_path", "check_model", "check_recipe"]
