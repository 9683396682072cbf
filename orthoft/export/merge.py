"""The dense merge: a fresh float32 copy of the base architecture holding every adapter merged in order.

Each adapted layer contributes ``layer.merged_weight(name, W)`` for every exported adapter in
order, starting from ``layer.dense_base_weight()`` (the exactly dequantized base weight): the
layer's own float32 math. Unadapted quantized layers are dequantized; a ``modules_to_save`` copy
replaces its original. Nothing is written into a 4-bit layer, which would requantize the merge.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..adapters.base import OrthoLayer
from .model import modules_to_save_choice


def resolve_module(root: nn.Module, path: str, adapter_names: list[str]) -> nn.Module:
    """The module at ``path`` of the adapted model, looking through PEFT's modules_to_save wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    module = root
    walked = []
    for part in path.split(".") if path else []:
        module = getattr(module, part)
        walked.append(part)
        if isinstance(module, ModulesToSaveWrapper):
            chosen = modules_to_save_choice(".".join(walked), module, adapter_names)
            module = module.modules_to_save[chosen] if chosen else module.original_module
        elif isinstance(module, AuxiliaryTrainingWrapper) or (
            isinstance(module, BaseTunerLayer) and not isinstance(module, OrthoLayer)
        ):
            raise TypeError(
                f"export_merged: {'.'.join(walked)} is a {type(module).__name__}, not an orthoft layer. "
                "Fix: merge_and_unload() the other PEFT method first, or export without it."
            )
    return module


def merged_dense_weight(layer: OrthoLayer, adapter_names: list[str]) -> torch.Tensor:
    """Float32 ``(out, in_features)`` weight of ``layer`` with ``adapter_names`` merged in order."""
    weight = layer.dense_base_weight().float()
    for name in adapter_names:
        if layer.has_adapter(name):
            weight = layer.merged_weight(name, weight)
    return weight


def _as_module_weight(layer: OrthoLayer, weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if layer.kind == "conv1d":
        weight = weight.T  # transformers Conv1D stores (in, out)
    return weight.reshape(shape)


def _source_tensor(module: nn.Module, attr: str, adapter_names: list[str]) -> torch.Tensor:
    from peft.utils import resolve_quantization_backend

    if isinstance(module, OrthoLayer):
        if attr == "weight":
            return merged_dense_weight(module, adapter_names)
        module = module.get_base_layer()
    backend = resolve_quantization_backend(module)
    if backend is not None and attr == "weight":
        return backend.get_base_weight(module).float()
    return getattr(module, attr)


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """Skip random initialization of the fresh model (every tensor is overwritten) and keep the RNG as it was."""
    # transformers 5 moved no_init_weights to transformers.initialization; 4.x has it in modeling_utils
    where = (
        "transformers.initialization"
        if importlib.util.find_spec("transformers.initialization") is not None
        else "transformers.modeling_utils"
    )
    no_init_weights = importlib.import_module(where).no_init_weights
    with torch.random.fork_rng(devices=[]), no_init_weights():
        yield


def _dense_config(base_model: nn.Module) -> Any:
    config = copy.deepcopy(base_model.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        config.__dict__.pop(key, None)
    return config


def _fill_parameters(dense: nn.Module, base_model: nn.Module, adapter_names: list[str]) -> None:
    """Copy every parameter of the adapted model (merged where adapted) into ``dense``, checking ties."""
    written: dict[int, tuple[str, torch.Tensor]] = {}
    merged_cache: dict[int, torch.Tensor] = {}
    for full_name, target in dense.named_parameters(remove_duplicate=False):
        path, _, attr = full_name.rpartition(".")
        source_module = resolve_module(base_model, path, adapter_names)
        if isinstance(source_module, OrthoLayer) and attr == "weight":
            key = id(source_module)
            if key not in merged_cache:
                merged_cache[key] = merged_dense_weight(source_module, adapter_names)
            value = _as_module_weight(source_module, merged_cache[key], target.shape)
        else:
            value = _source_tensor(source_module, attr, adapter_names)
        if value is None or tuple(value.shape) != tuple(target.shape):
            raise RuntimeError(
                f"export_merged: {full_name} has shape {tuple(target.shape)} in the fresh model but "
                f"{None if value is None else tuple(value.shape)} in the adapted model. This architecture "
                "cannot be rebuilt from its config; please report it."
            )
        value = value.detach().to(device="cpu", dtype=torch.float32)
        previous = written.get(id(target))
        if previous is not None and not torch.equal(previous[1], value):
            raise ValueError(
                f"export_merged: {full_name} is tied to {previous[0]} in this architecture but the adapters "
                "changed only one of them. Fix: exclude tied layers (e.g. lm_head) from target_modules, "
                "or set config.tie_word_embeddings=False before training."
            )
        target.copy_(value)
        written[id(target)] = (full_name, value)


def _fill_buffers(dense: nn.Module, base_model: nn.Module, adapter_names: list[str]) -> None:
    for full_name, buffer in dense.named_buffers():
        path, _, attr = full_name.rpartition(".")
        source_module = resolve_module(base_model, path, adapter_names)
        source = getattr(source_module, attr, None)
        if isinstance(source, torch.Tensor) and source.shape == buffer.shape and source.device.type != "meta":
            buffer.copy_(source.detach().to(device="cpu", dtype=buffer.dtype))


def build_dense_model(base_model: nn.Module, adapter_names: list[str]) -> nn.Module:
    """A fresh float32 copy of the base architecture holding the merged weights, on CPU."""
    config = _dense_config(base_model)
    with _no_weight_init():
        dense = type(base_model)._from_config(config, dtype=torch.float32)
    dense.eval()
    generation_config = getattr(base_model, "generation_config", None)
    if generation_config is not None:
        dense.generation_config = copy.deepcopy(generation_config)
    with torch.no_grad():
        _fill_parameters(dense, base_model, adapter_names)
        _fill_buffers(dense, base_model, adapter_names)
    return dense


def check_finite(model: nn.Module, adapter_names: list[str], dtype: torch.dtype) -> None:
    """Refuse NaN/inf in any floating tensor about to be written, naming the tensor and the fix."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        bad = (~torch.isfinite(tensor)).sum()
        if bad:
            raise ValueError(
                f"export_merged: tensor {name} has {int(bad)} NaN/inf values after merging adapters "
                f"{adapter_names} (written as {str(dtype).removeprefix('torch.')}); nothing was written. "
                "Fix: for fp16 overflow export bf16 or fp32; otherwise the adapter weights are broken "
                "(check training for NaN losses)."
            )


__all__ = ["build_dense_model", "check_finite", "merged_dense_weight", "resolve_module"]
