"""Requantizing the dense merge: which bitsandbytes config, and the quantized model it gives."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import keep_bnb_4bit_unpacked
from ..io.files import make_staging_dir

QUANTIZATIONS = ("base", "nf4", "fp4", "int8")


def base_quantization_config(base_model: nn.Module) -> Any | None:
    """The base's quantization config (a ``BitsAndBytesConfig`` for bitsandbytes, else as stored), or None."""
    config = getattr(base_model.config, "quantization_config", None)
    if config is None:
        return None
    from transformers import BitsAndBytesConfig

    if isinstance(config, dict):
        if config.get("quant_method") != "bitsandbytes":
            return config
        config = BitsAndBytesConfig.from_dict(config)
    return config


def resolve_quantization(quantization: str | Any | None, base_model: nn.Module, dtype: torch.dtype) -> Any | None:
    """The ``BitsAndBytesConfig`` to requantize with (None: dense weights); see ``export_merged``."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"export_merged: quantization {quantization!r} is not known. "
            f"Fix: use one of {list(QUANTIZATIONS)}, a BitsAndBytesConfig, or None for dense weights."
        )
    if quantization == "base":
        config = base_quantization_config(base_model)
        if config is None:
            quantization = "nf4"
        elif not isinstance(config, BitsAndBytesConfig):
            raise ValueError(
                f"export_merged: the base is quantized with {config.get('quant_method')!r}; only bitsandbytes "
                "can be requantized here. Fix: pass quantization='nf4' (or 'int8'), or None for dense weights."
            )
        else:
            config = copy.deepcopy(config)
            if config.load_in_4bit:
                config.bnb_4bit_compute_dtype = dtype
            return config
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def quantization_dict(config: Any | None) -> dict[str, Any] | None:
    """``config`` as JSON-ready data (dtypes as strings), for the report and the model card."""
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: str(value) if isinstance(value, torch.dtype) else value for key, value in data.items()}


def requantize(
    dense: nn.Module, quantization_config: Any, dtype: torch.dtype, out_dir: Path, device: torch.device
) -> nn.Module:
    """Quantize the dense merge with transformers' own bitsandbytes loader (the format a user would load).

    The dense weights pass through a scratch folder named like a staging folder of ``out_dir``
    (``.NAME.partial-PID-*``), so a crash leaves nothing that the next export would not clean up.
    """
    scratch = make_staging_dir(out_dir)
    try:
        dense.save_pretrained(scratch, safe_serialization=True)
        device_map = {"": device.index if device.type == "cuda" else str(device)}
        quantized = type(dense).from_pretrained(
            scratch, quantization_config=quantization_config, dtype=dtype, device_map=device_map
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    quantized.eval()
    for module in quantized.modules():
        # measure the requantized weights themselves, not bitsandbytes' bf16 CPU inference kernel
        keep_bnb_4bit_unpacked(module)
    return quantized


__all__ = ["QUANTIZATIONS", "base_quantization_config", "quantization_dict", "requantize", "resolve_quantization"]
