"""Orthoft adapters in diffusers pipelines: loading into any pipeline, tiny digits pipeline, DreamBooth, concepts.

Importing this package imports diffusers' loaders (not the pipelines) and guards diffusers' LoRA
entry points (``pipe.load_lora_weights``, ``lora_state_dict``, ``model.load_lora_adapter``,
``unet.load_attn_procs``): given an orthoft adapter they raise a ``ValueError`` naming
``orthoft.diffusion.load_adapter`` instead of loading nothing (``orthoft.diffusion.guard``). The
other modules load on first use. The command line is ``orthoft.cli.diffusion``.

* ``orthoft.diffusion.loaders``: the pipeline API, re-exported here: ``load_adapter(pipe, path)``,
  ``save_adapter``, ``set_adapters``, ``active_adapters``, ``list_adapters``, ``adapters_disabled``,
  ``delete_adapter``, ``merge_adapters`` (into ``pipe.unet`` or ``pipe.transformer``).
* ``orthoft.diffusion.pipeline_io``: ``export_pipeline`` (a merged pipeline for plain diffusers), and
  the older handle-based ``load_adapter_into_pipeline`` / ``merge_adapter_into_pipeline``.
* ``orthoft.diffusion.models``: tiny pixel-space IF pipeline from a fixed config (MiniLM text
  encoder), UNet target-module groups, prompt/image encoding shared with Stable Diffusion.
* ``orthoft.diffusion.train``: Accelerate loop for pre-training and DreamBooth adapter fine-tuning.
* ``orthoft.diffusion.recipe`` / ``digits``: the YAML recipe schema and the digits recipe runner.
* ``orthoft.diffusion.concepts``: loading, merging and measuring Orthogonal Adaptation concepts (the
  method itself, registered with PEFT like every orthoft method, is ``orthoft.adapters.orthogonal_adaptation``).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..adapters.orthogonal_adaptation import OrthogonalAdaptationConfig
from . import guard

guard.install()

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
    "load_adapter": "loaders",
    "save_adapter": "loaders",
    "set_adapters": "loaders",
    "active_adapters": "loaders",
    "list_adapters": "loaders",
    "adapters_disabled": "loaders",
    "delete_adapter": "loaders",
    "merge_adapters": "loaders",
    "export_pipeline": "pipeline_io",
    "load_adapter_into_pipeline": "pipeline_io",
    "merge_adapter_into_pipeline": "pipeline_io",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'orthoft.diffusion' has no attribute {name!r}")


__all__ = ["OrthogonalAdaptationConfig", *sorted(_LAZY)]
