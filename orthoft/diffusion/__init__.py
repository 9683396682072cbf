"""Orthogonal adapters in diffusers pipelines: tiny digits pipeline, DreamBooth training, Orthogonal Adaptation.

Importing this package is cheap: the diffusers-based modules load on first use. The command line
is ``orthoft.cli.diffusion``.

* ``orthoft.diffusion.models``: tiny pixel-space IF pipeline from a fixed config (MiniLM text
  encoder), UNet target-module groups, prompt/image encoding shared with Stable Diffusion.
* ``orthoft.diffusion.train``: Accelerate loop for pre-training and DreamBooth adapter fine-tuning.
* ``orthoft.diffusion.recipe`` / ``digits``: the YAML recipe schema and the digits recipe runner.
* ``orthoft.diffusion.pipeline_io``: saving adapters, loading them into a pipeline, merging, export.
* ``orthoft.diffusion.concepts``: loading, merging and measuring Orthogonal Adaptation concepts (the
  method itself, registered with PEFT like every orthoft method, is ``orthoft.adapters.orthogonal_adaptation``).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..adapters.orthogonal_adaptation import OrthogonalAdaptationConfig

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


__all__ = ["OrthogonalAdaptationConfig", *sorted(_LAZY)]
