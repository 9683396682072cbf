"""Adapters and diffusers pipelines: save, load into a pipeline, merge into the UNet, export plain diffusers.

An adapter trained on ``pipeline.unet`` is saved alone (``peft_unet.save_pretrained(dir)``: a few
hundred kB). Loading it into any pipeline with the same UNet architecture injects it into
``pipeline.unet`` in place, so ``pipeline(...)`` samples with it. Merging folds it into the UNet
weights (Conv2d exactly: ``W R^T`` on the flattened filter) and removes every adapter module;
the merged pipeline's ``save_pretrained`` output loads with plain
``diffusers.DiffusionPipeline.from_pretrained``, without orthoft or PEFT.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DiffusionPipeline
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

import orthoft.adapters  # noqa: F401  (registers every orthoft method, Orthogonal Adaptation included)

from ..io.files import staged_directory


def load_adapter_into_pipeline(
    pipeline: DiffusionPipeline, adapter_dir: str | Path, adapter_name: str = "default"
) -> PeftModel:
    """Inject a saved orthoft adapter into ``pipeline.unet`` (in place); returns the PEFT handle.

    Use the handle to merge, switch adapters or disable them (``with handle.disable_adapter():``).
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"load_adapter_into_pipeline: {adapter_dir} has no adapter_config.json. Fix: pass the folder written by "
            "save_pretrained (a non-default adapter is saved in a subfolder named after it)."
        )
    return PeftModel.from_pretrained(pipeline.unet, str(adapter_dir), adapter_name=adapter_name)


def merge_adapter_into_pipeline(
    pipeline: DiffusionPipeline, peft_unet: PeftModel, adapter_names: list[str] | None = None
) -> DiffusionPipeline:
    """Fold the active (or the named) adapters into ``pipeline.unet``; no adapter module remains."""
    if peft_unet.get_base_model() is not pipeline.unet:
        raise ValueError(
            "merge_adapter_into_pipeline: the PEFT model does not wrap this pipeline's UNet. Fix: pass the handle "
            "returned by load_adapter_into_pipeline / finetune_adapter for this pipeline."
        )
    merged = peft_unet.merge_and_unload(adapter_names=adapter_names)
    leftover = [name for name, module in merged.named_modules() if isinstance(module, BaseTunerLayer)]
    if leftover:
        raise RuntimeError(f"merge_adapter_into_pipeline: adapter modules remain after merging: {leftover[:5]}")
    # PEFT leaves its bookkeeping on the unwrapped model; plain diffusers must not see it
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(merged, attribute) and attribute in vars(merged):
            delattr(merged, attribute)
    pipeline.unet = merged
    return pipeline


def export_pipeline(pipeline: DiffusionPipeline, output_dir: str | Path) -> Path:
    """``save_pretrained`` in safetensors, staged so ``output_dir`` appears complete or not at all.

    An existing ``output_dir`` is replaced. Refuses a UNet that still holds adapter modules.
    """
    leftover = [name for name, module in pipeline.unet.named_modules() if isinstance(module, BaseTunerLayer)]
    if leftover:
        raise ValueError(
            f"export_pipeline: the UNet still holds adapter modules ({leftover[0]}, ...); plain diffusers could not "
            "load it. Fix: merge_adapter_into_pipeline(pipeline, peft_unet) first."
        )
    output_dir = Path(output_dir)
    with staged_directory(output_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return output_dir
