"""Measuring an export: logits of the adapter model and of the exported model on one probe batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..adapters.base import OrthoLayer, keep_bnb_4bit_unpacked
from .model import device_of, modules_to_save_choice

PROBE_SHAPE = (2, 32)
PROBE_SEED = 0


def default_probe(base_model: nn.Module) -> dict[str, torch.Tensor]:
    """A seeded batch of ``PROBE_SHAPE`` random token ids for ``base_model``'s vocabulary."""
    config = base_model.config
    vocab_size = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 0)
    if not vocab_size:
        raise ValueError(
            f"export_merged: cannot build a probe batch for {type(base_model).__name__} (its config has no "
            "vocab_size). Fix: pass probe_inputs={...} with the keyword arguments of one forward call."
        )
    generator = torch.Generator().manual_seed(PROBE_SEED)
    input_ids = torch.randint(0, vocab_size, PROBE_SHAPE, generator=generator)
    probe = {"input_ids": input_ids}
    if getattr(config, "is_encoder_decoder", False):
        probe["decoder_input_ids"] = input_ids
    return probe


def describe_probe(probe_inputs: Mapping[str, Any]) -> str:
    """``input_ids (2, 32), use_cache=False``: what the model card says the probe was."""
    parts = []
    for key, value in probe_inputs.items():
        parts.append(f"{key} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"{key}={value!r}")
    return ", ".join(parts)


def model_logits(model: nn.Module, probe_inputs: Mapping[str, Any]) -> torch.Tensor:
    """Float32 CPU logits (or last hidden state / sample) of one eval-mode forward; the mode is restored."""
    device = device_of(model)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in probe_inputs.items()}
    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: tensors cached during the probe must stay usable for training later
        with torch.no_grad():
            output = model(**inputs)
    finally:
        model.train(was_training)
    for key in ("logits", "last_hidden_state", "sample"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value.detach().float().cpu()
    if isinstance(output, torch.Tensor):
        return output.detach().float().cpu()
    first = output[0] if isinstance(output, (tuple, list)) else None
    if isinstance(first, torch.Tensor):
        return first.detach().float().cpu()
    raise TypeError(f"export_merged: cannot find logits in a {type(output).__name__} output. Fix: pass probe_inputs.")


def logit_error(actual: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Max and mean absolute difference, each also relative to ``reference``'s max / mean magnitude."""
    diff = (actual - reference).abs()
    scale_max = reference.abs().max().clamp_min(1e-12)
    scale_mean = reference.abs().mean().clamp_min(1e-12)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "relative_max": float(diff.max() / scale_max),
        "relative_mean": float(diff.mean() / scale_mean),
    }


@contextlib.contextmanager
def bnb_4bit_layers_exact(base_model: nn.Module) -> Iterator[None]:
    """Probe and dequantize every bnb 4-bit layer in its standard layout, then let unadapted ones repack again.

    On AVX512-BF16 CPUs bitsandbytes repacks 4-bit layers for a bf16 kernel at eval time. The
    reference logits would then carry that kernel's bf16 rounding, and PEFT's dequantization misreads
    the repacked layout. Undoing the repack is exact (the bf16 block scales are kept).
    """
    flags = []
    for module in base_model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            flags.append((module, module.support_avx512bf16_for_cpu))
            keep_bnb_4bit_unpacked(module)
    try:
        yield
    finally:
        for module, flag in flags:
            module.support_avx512bf16_for_cpu = flag


@contextlib.contextmanager
def only_adapters_active(
    base_model: nn.Module, layers: dict[str, OrthoLayer], adapter_names: list[str]
) -> Iterator[None]:
    """Activate exactly ``adapter_names`` (in order) everywhere, restoring every layer afterwards.

    Goes through each layer's and each ``modules_to_save`` wrapper's own ``set_adapter`` /
    ``enable_adapters`` (not the model-level ones, which would also change the adapter the model
    records as active). Those also flip ``requires_grad`` on adapter parameters, so every
    parameter's flag is saved first and put back: the user's trainable set is left as it was.
    """
    from peft.utils.other import ModulesToSaveWrapper

    requires_grad = [(param, param.requires_grad) for param in base_model.parameters()]
    saved: list[tuple[nn.Module, str | list[str], bool | None]] = []
    try:
        for layer in layers.values():
            saved.append((layer, layer.active_adapter, layer.disable_adapters))
            layer.enable_adapters(True)
            layer.set_adapter([name for name in adapter_names if layer.has_adapter(name)])
        for module_name, wrapper in base_model.named_modules():
            if isinstance(wrapper, ModulesToSaveWrapper):
                saved.append((wrapper, wrapper.active_adapter, None))
                chosen = modules_to_save_choice(module_name, wrapper, adapter_names)
                wrapper.set_adapter([chosen] if chosen else [])
        yield
    finally:
        for module, active, disabled in saved:
            if disabled is not None:
                module.enable_adapters(not disabled)
            module.set_adapter(active)
        for param, flag in requires_grad:
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def adapter_logits(
    peft_model: nn.Module,
    base_model: nn.Module,
    layers: dict[str, OrthoLayer],
    adapter_names: list[str],
    probe_inputs: Mapping[str, Any],
) -> torch.Tensor:
    """Logits of the adapter model with exactly ``adapter_names`` active, in order."""
    with only_adapters_active(base_model, layers, adapter_names):
        return model_logits(peft_model, probe_inputs)


__all__ = [
    "PROBE_SEED",
    "PROBE_SHAPE",
    "adapter_logits",
    "bnb_4bit_layers_exact",
    "default_probe",
    "describe_probe",
    "logit_error",
    "model_logits",
    "only_adapters_active",
]
