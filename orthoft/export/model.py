"""The adapted model as export sees it: its transformers base, its orthoft layers, the adapters to merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..adapters.base import OrthoLayer


def base_model_of(peft_model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself when adapters were injected)."""
    get_base = getattr(peft_model, "get_base_model", None)
    base = get_base() if callable(get_base) else peft_model
    if not hasattr(base, "config") or not hasattr(base, "save_pretrained"):
        raise TypeError(
            f"export_merged: the base model is a {type(base).__name__}, not a transformers PreTrainedModel. "
            "Fix: export models loaded with transformers (diffusers and plain nn.Modules are not supported)."
        )
    return base


def ortho_layers(model: nn.Module) -> dict[str, OrthoLayer]:
    """Every orthoft adapter layer of ``model``, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, OrthoLayer)}


def device_of(model: nn.Module) -> torch.device:
    """The device of the first parameter that is not on the meta device (CPU when there is none)."""
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def resolve_adapter_names(
    peft_model: nn.Module, layers: dict[str, OrthoLayer], adapter_names: Sequence[str] | None
) -> list[str]:
    """The adapters to merge, in order (default: the active ones), checked against the model."""
    known: dict[str, None] = {}
    for layer in layers.values():
        for name in layer.adapter_configs:
            known[name] = None
    if adapter_names is None:
        active = getattr(peft_model, "active_adapters", None)
        if active is None:
            active = next(iter(layers.values())).active_adapters
        adapter_names = [active] if isinstance(active, str) else list(active)
    elif isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    adapter_names = list(adapter_names)
    if not adapter_names:
        raise ValueError("export_merged: adapter_names is empty. Fix: name at least one adapter to merge.")
    missing = [name for name in adapter_names if name not in known]
    if missing:
        raise ValueError(f"export_merged: adapter(s) {missing} not in the model. Fix: pick among {list(known)}.")
    if len(set(adapter_names)) != len(adapter_names):
        raise ValueError(f"export_merged: adapter_names {adapter_names} repeats a name. Fix: list each adapter once.")
    for module_name, layer in layers.items():
        if layer.merged_adapters:
            raise ValueError(
                f"export_merged: {module_name} has adapter(s) {layer.merged_adapters} merged into its base weight "
                "(for a quantized base that rounds the merge to 4 bits). Fix: call unmerge_adapter() first; "
                "export merges exactly from the unmerged adapters."
            )
    return adapter_names


def modules_to_save_choice(module_name: str, wrapper: nn.Module, adapter_names: list[str]) -> str | None:
    """Which adapter's ``modules_to_save`` copy of ``module_name`` the export uses (None: the original)."""
    trained = [name for name in adapter_names if name in wrapper.modules_to_save]
    if len(trained) > 1:
        raise ValueError(
            f"export_merged: adapters {trained} each train their own copy of {module_name} (modules_to_save); "
            "full copies cannot be combined. Fix: export those adapters separately."
        )
    return trained[0] if trained else None


__all__ = ["base_model_of", "device_of", "modules_to_save_choice", "ortho_layers", "resolve_adapter_names"]
