"""Accelerate training from validated YAML recipes (what ``orthoft train RECIPE.yaml`` runs).

Modules: ``recipe`` (schema and validation), ``models`` (base models, 4/8-bit, adapters),
``data`` (tokenized splits and the deterministic batch order), ``engine`` (the pieces every
Accelerate loop shares, diffusion's included), ``checkpoint`` (checkpoints and exact resume),
``runlog`` (metrics log, curves, summary) and ``loop`` (:func:`train`). Run on several processes
with ``accelerate launch`` or ``torchrun``; the command line is ``orthoft.cli.train``.
"""

from __future__ import annotations

from .checkpoint import TrainerState, latest_checkpoint, trainable_state
from .loop import train
from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from .runlog import plot_curves

__all__ = [
    "Recipe",
    "RecipeError",
    "TrainerState",
    "latest_checkpoint",
    "load_recipe",
    "plot_curves",
    "recipe_from_dict",
    "trainable_state",
    "train",
]
