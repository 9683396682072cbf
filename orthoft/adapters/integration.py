"""What PEFT and transformers expect of a tuner beyond injecting layers (used by ``OrthoTuner``).

* ``target_modules="all-linear"`` for a second adapter: PEFT's scan recognises an already
  wrapped layer only by ``"Linear"`` in its class name (``lora.Linear``); orthoft's layers are
  named per method (``OFTLayer``), so the scan would skip every layer the first adapter took.
* ``autocast_adapter_dtype=False``: PEFT leaves LoRA's weights in the base's dtype; orthoft builds
  float32 adapters, so it casts them to the base's dtype when asked.
* ``merge_and_unload()`` on a 4-bit/8-bit base requantizes every merged weight: warn and point to
  ``orthoft.export_merged``, which merges at full precision.

Nothing here imports the layer classes: ``OrthoTuner`` passes what it found.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES
from torch import nn
from transformers import PreTrainedModel


def is_all_linear(peft_config: PeftConfig) -> bool:
    """Whether the config asks for ``target_modules="all-linear"`` (any case), PEFT's shorthand."""
    targets = getattr(peft_config, "target_modules", None)
    return isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


def _heads(model: nn.Module, peft_config: PeftConfig) -> set[int]:
    """ids of the modules PEFT's all-linear scan leaves out: the output embedding or a classifier head."""
    if not isinstance(model, PreTrainedModel):
        return set()
    output = model.get_output_embeddings()
    if output is not None:
        return {id(output)}
    if getattr(peft_config.task_type, "value", peft_config.task_type) == "SEQ_CLS":
        return {id(getattr(model, name)) for name in SEQ_CLS_HEAD_NAMES if getattr(model, name, None) is not None}
    return set()


def expand_all_linear(peft_config: PeftConfig, model: nn.Module, wrapped: Iterable[str]) -> None:
    """Resolve ``"all-linear"`` to module names in place, counting the linear-like layers orthoft already wraps.

    ``wrapped``: names of orthoft layers whose base is Linear, Conv1D or a quantized linear. PEFT's
    own scan finds the plain layers; the wrapped ones are added unless they are the output head
    (which PEFT's scan leaves out too) or sit inside another adapter layer.
    """
    wrapped = set(wrapped)
    if not is_all_linear(peft_config) or not wrapped:
        return  # PEFT's scan is complete on a model orthoft has not wrapped yet
    modules = dict(model.named_modules())
    heads = _heads(model, peft_config)
    nested = {
        f"{prefix}.{suffix}"
        for prefix, module in modules.items()
        if isinstance(module, BaseTunerLayer)
        for suffix, _ in module.named_modules()
        if suffix
    }
    _maybe_include_all_linear_layers(peft_config, model)  # now a set of names
    extra = {name for name in wrapped if id(modules[name]) not in heads and name not in nested}
    peft_config.target_modules = set(peft_config.target_modules) | extra


def cast_adapter_to_base_dtype(layer: BaseTunerLayer, adapter_name: str) -> None:
    """Cast ``adapter_name``'s weights (``layer.adapter_layer_names``) to its base weight's floating dtype.

    What ``autocast_adapter_dtype=False`` means for LoRA in PEFT: the adapter weights keep the
    base's dtype. Frozen per-adapter buffers (bases, factors) stay float32 as the methods build them:
    they are no weights, and their products are formed in float32. A quantized base (integer
    storage) leaves the weights as they are, as PEFT does for LoRA.
    """
    weight = getattr(layer.get_base_layer(), "weight", None)
    if weight is None or not weight.dtype.is_floating_point:
        return
    for name in layer.adapter_layer_names:
        container = getattr(layer, name, None)
        if not isinstance(container, nn.ParameterDict) or adapter_name not in container:
            continue
        param = container[adapter_name]
        if param.is_floating_point() and param.dtype != weight.dtype:
            # a new Parameter through the dict, as PEFT's cast_adapter_dtype does; requires_grad is kept
            container[adapter_name] = nn.Parameter(param.detach().to(weight.dtype), requires_grad=param.requires_grad)


def warn_requantizing_merge(quantized: list[str]) -> None:
    """Warn that merging into ``quantized`` (module names on a 4-bit/8-bit base) requantizes their weights."""
    if not quantized:
        return
    shown = ", ".join(quantized[:3]) + (f" and {len(quantized) - 3} more" if len(quantized) > 3 else "")
    warnings.warn(
        f"merge_and_unload: {len(quantized)} adapted layer(s) ({shown}) sit on a quantized (bitsandbytes) base. "
        "Merging dequantizes each weight, applies the adapter and quantizes the result again, so the merged "
        "model carries a second rounding error on top of the adapter. For a merged model at full precision "
        "(or one requantization whose error is measured and reported) use "
        "orthoft.export_merged(peft_model, out_dir) or `orthoft export` instead.",
        UserWarning,
        stacklevel=3,
    )
