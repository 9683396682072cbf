"""A merged pipeline for plain diffusers, and the older handle-based loader.

The pipeline API is ``orthoft.diffusion.loaders`` (``load_adapter(pipe, path)``, ``save_adapter``,
``set_adapters``, ``merge_adapters``...). Here:

* ``export_pipeline``: ``save_pretrained`` of a pipeline whose adapters are merged (staged, safetensors);
  the folder loads with plain ``diffusers.DiffusionPipeline.from_pretrained``, without orthoft or PEFT.
* ``load_adapter_into_pipeline``: ``PeftModel.from_pretrained(pipeline.unet, path)``, for code that wants
  PEFT's ``PeftModel`` handle (``with handle.disable_adapter():``, ``handle.merge_and_unload()``).
* ``merge_adapter_into_pipeline``: ``merge_adapters`` for such a handle (or the one ``finetune_adapter`` returns).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DiffusionPipeline
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..io.adapter_files import check_adapter_folder
from ..io.files import staged_directory
from .loaders import merge_adapters


def load_adapter_into_pipeline(
    pipeline: DiffusionPipeline, adapter_dir: str | Path, adapter_name: str = "default"
) -> PeftModel:
    """Inject a saved orthoft adapter into ``pipeline.unet`` (in place); returns the PEFT handle.

    Prefer ``orthoft.diffusion.load_adapter(pipe, path)``, which also serves ``pipe.transformer``
    and several adapters without a handle. Use the handle to merge, switch adapters or disable
    them (``with handle.disable_adapter():``).
    """
    check_adapter_folder(adapter_dir)
    return PeftModel.from_pretrained(pipeline.unet, str(adapter_dir), adapter_name=adapter_name)


def merge_adapter_into_pipeline(
    pipeline: DiffusionPipeline, peft_unet: PeftModel, adapter_names: list[str] | None = None
) -> DiffusionPipeline:
    """Fold the active (or the named) adapters of ``peft_unet`` into ``pipeline.unet``; no adapter module remains."""
    if peft_unet.get_base_model() is not pipeline.unet:
        raise ValueError(
            "merge_adapter_into_pipeline: the PEFT model does not wrap this pipeline's UNet. Fix: pass the handle "
            "returned by load_adapter_into_pipeline / finetune_adapter for this pipeline."
        )
    return merge_adapters(pipeline, adapter_names, component="unet")


def export_pipeline(pipeline: DiffusionPipeline, output_dir: str | Path) -> Path:
    """``save_pretrained`` in safetensors, staged so ``output_dir`` appears complete or not at all.

    An existing ``output_dir`` is replaced. Refuses a pipeline whose models still hold adapter modules.
    """
    for name, component in pipeline.components.items():
        if not isinstance(component, nn.Module):
            continue
        leftover = [key for key, module in component.named_modules() if isinstance(module, BaseTunerLayer)]
        if leftover:
            raise ValueError(
                f"export_pipeline: pipeline.{name} still holds adapter modules ({leftover[0]}, ...); plain diffusers "
                f"could not load it. Fix: orthoft.diffusion.merge_adapters(pipe, component={name!r}) first."
            )
    output_dir = Path(output_dir)
    with staged_directory(output_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return output_dir
