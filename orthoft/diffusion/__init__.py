"""Orthogonal adapters in diffusers pipelines: tiny digits pipeline, DreamBooth training, Orthogonal Adaptation.

Importing this package registers the Orthogonal Adaptation method with PEFT (cheap); the
diffusers-based modules load on first use, so ``orthoft --help`` stays fast.

* ``orthoft.diffusion.models``: tiny pixel-space IF pipeline from a fixed config (MiniLM text
  encoder), UNet target-module groups, prompt/image encoding shared with Stable Diffusion.
* ``orthoft.diffusion.train``: Accelerate loop for pre-training and DreamBooth adapter fine-tuning.
* ``orthoft.diffusion.recipe`` / ``digits``: the YAML recipe schema and the digits recipe runner.
* ``orthoft.diffusion.pipeline_io``: saving adapters, loading them into a pipeline, merging, export.
* ``orthoft.diffusion.orthogonal_adaptation``: concept adapters with mutually orthogonal bases.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import orthogonal_adaptation  # noqa: F401  (registers ORTHOFT_ORTHOGONAL_ADAPTATION with PEFT)
from .cli import add_parser
from .orthogonal_adaptation import OrthogonalAdaptationConfig

_LAZY = {
    "build_tiny_pipeline": "models",
    "build_tiny_unet": "models",
    "unet_target_modules": "models",
    "load_pipeline": "models",
    "DenoiserTrainingSettings": "train",
    "ImageSet": "train",
    "finetune_adapter": "train",
    "pretrain_unet": "train",
    "generate": "train",
    "DiffusionRecipe": "recipe",
    "load_recipe": "recipe",
    "run_digits_recipe": "digits",
    "pretrained_digits_pipeline": "digits",
    "load_adapter_into_pipeline": "pipeline_io",
    "merge_adapter_into_pipeline": "pipeline_io",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'orthoft.diffusion' has no attribute {name!r}")


__all__ = ["OrthogonalAdaptationConfig", "add_parser", *sorted(_LAZY)]
