"""The export's model card (README.md) and provenance: adapter configs, methods, base, orthoft version."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..adapters.base import OrthoLayer
from ..version import __version__
from .report import ExportReport, format_error


def _peft_configs(peft_model: nn.Module) -> Mapping[str, Any]:
    return getattr(peft_model, "peft_config", None) or {}


def adapter_configs(peft_model: nn.Module, layers: dict[str, OrthoLayer], adapter_names: list[str]) -> dict:
    """Each exported adapter's config as JSON-ready data (sets sorted, unset revision/task_type dropped)."""
    configs = {}
    peft_configs = _peft_configs(peft_model)
    for name in adapter_names:
        config = peft_configs.get(name)
        if config is None:
            config = next(layer.adapter_configs[name] for layer in layers.values() if name in layer.adapter_configs)
        data = config.to_dict()
        configs[name] = {
            key: sorted(value) if isinstance(value, set) else value
            for key, value in data.items()
            if key not in ("revision", "task_type") or value is not None
        }
    return json.loads(json.dumps(configs, default=str))


def adapter_methods(layers: dict[str, OrthoLayer], adapter_names: list[str]) -> dict[str, str]:
    """Adapter name -> orthoft method name (``OFT``, ``PSOFT``, ...)."""
    methods = {}
    for name in adapter_names:
        layer = next(layer for layer in layers.values() if layer.has_adapter(name))
        methods[name] = layer.method_name
    return methods


def base_name(peft_model: nn.Module, base_model: nn.Module, adapter_names: list[str]) -> str:
    """What the card names as base: the first adapter's ``base_model_name_or_path``, else the config's path."""
    config = _peft_configs(peft_model).get(adapter_names[0])
    name = getattr(config, "base_model_name_or_path", None) or getattr(base_model.config, "_name_or_path", "")
    return str(name) or "unknown"


def _error_table(report: ExportReport) -> list[str]:
    lines = [
        "| comparison | error |",
        "| --- | --- |",
        f"| float32 merge vs adapter model | {format_error(report.merge_error)} |",
        f"| this export as written vs adapter model | {format_error(report.export_error)} |",
    ]
    if report.requantization_error is not None:
        lines.append(
            f"| added by requantization (export vs float32 merge) | {format_error(report.requantization_error)} |"
        )
    return lines


def model_card(report: ExportReport, configs: dict[str, dict]) -> str:
    """The README.md of the export: front matter, what was merged and how, measured errors, provenance."""
    methods = sorted(set(report.methods.values()))
    tags = "\n".join(f"- orthoft-{m.lower()}" for m in methods)
    order = " then ".join(f"`{name}` ({report.methods[name]})" for name in report.adapters)
    if report.quantization is None:
        written = f"dense {report.dtype} weights"
    else:
        kind = report.quantization.get("bnb_4bit_quant_type") if report.quantization.get("load_in_4bit") else "int8"
        written = f"bitsandbytes {kind} weights (non-quantized tensors in {report.dtype}), requantized after the merge"
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {report.base}",
        "tags:",
        "- orthoft",
        tags,
        "---",
        "",
        f"# Merged orthoft export of `{report.base}`",
        "",
        f"Adapters merged in order: {order}. The folder holds {written}; it loads with "
        "`AutoModel*.from_pretrained` and needs neither orthoft nor PEFT.",
        "",
        "## How it was merged",
        "",
        "Each adapted layer's base weight was dequantized (when quantized) and the adapters were merged in float32 "
        "with the layer's own math (multiplicative methods: `W -> W T^T` and an optional output scale; additive "
        "methods: `W -> W + dW`). Layers without an adapter were copied (dequantized when quantized).",
        "",
        "## Measured error",
        "",
        f"Logits of the adapter model vs this export on a probe batch ({report.probe}):",
        "",
        *_error_table(report),
        "",
        "## Provenance",
        "",
        f"- orthoft version: {__version__}",
        f"- methods: {', '.join(methods)}",
        f"- quantization: {json.dumps(report.quantization) if report.quantization else 'none (dense)'}",
        "",
        "Adapter configs:",
        "",
        "```json",
        json.dumps(configs, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["adapter_configs", "adapter_methods", "base_name", "model_card"]
