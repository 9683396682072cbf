"""``export_merged`` (adapter model -> plain Hugging Face model folder) and ``load_for_export``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import OrthoLayer
from ..io.dtypes import DTYPES, FLOAT_DTYPES, dtype_name, resolve_dtype
from ..io.files import make_staging_dir, publish_directory, remove_stale_partials, sync_tree
from ..version import __version__
from .card import adapter_configs, adapter_methods, base_name, model_card
from .merge import build_dense_model, check_finite
from .model import base_model_of, device_of, ortho_layers, resolve_adapter_names
from .probe import (
    PROBE_SEED,
    PROBE_SHAPE,
    adapter_logits,
    bnb_4bit_layers_exact,
    default_probe,
    describe_probe,
    logit_error,
    model_logits,
)
from .quantize import quantization_dict, requantize, resolve_quantization
from .report import EXPORT_INFO_FILE, ExportReport

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


def written_dtype(dtype: str | torch.dtype | None, base_model: nn.Module) -> torch.dtype:
    """``dtype`` itself, or (None / ``auto``) the base config's float dtype, float32 when it has none."""
    if dtype is not None and dtype != "auto":
        return resolve_dtype(dtype, where="export_merged")
    config_dtype = getattr(base_model.config, "dtype", None) or getattr(base_model.config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = DTYPES.get(config_dtype.removeprefix("torch."))
    return config_dtype if config_dtype in FLOAT_DTYPES else torch.float32


@dataclasses.dataclass
class _ExportPlan:
    """What ``export_merged`` was asked to do, resolved and checked before anything is computed."""

    out_dir: Path
    base_model: nn.Module
    layers: dict[str, OrthoLayer]
    adapter_names: list[str]
    dtype: torch.dtype
    quantization_config: Any | None
    probe_inputs: dict[str, Any]
    probe_text: str


def _plan_export(
    peft_model: nn.Module,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype | None,
    quantization: str | Any | None,
    adapter_names: Sequence[str] | None,
    probe_inputs: Mapping[str, torch.Tensor] | None,
    overwrite: bool,
) -> _ExportPlan:
    out_dir = Path(out_dir).absolute()
    base_model = base_model_of(peft_model)
    layers = ortho_layers(base_model)
    if not layers:
        raise ValueError(
            f"export_merged: {type(peft_model).__name__} holds no orthoft adapter layer. "
            "Fix: pass the model returned by get_peft_model/PeftModel.from_pretrained with an orthoft config."
        )
    adapter_names = resolve_adapter_names(peft_model, layers, adapter_names)
    target_dtype = written_dtype(dtype, base_model)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"export_merged: {out_dir} already exists. Fix: choose a new out_dir or pass overwrite=True."
        )
    quantization_config = resolve_quantization(quantization, base_model, target_dtype)
    if probe_inputs is None:
        probe_inputs = default_probe(base_model)
        probe_text = f"{PROBE_SHAPE[0]} x {PROBE_SHAPE[1]} random token ids, seed {PROBE_SEED}"
    else:
        probe_inputs = dict(probe_inputs)
        probe_text = "given inputs " + describe_probe(probe_inputs)
    return _ExportPlan(
        out_dir, base_model, layers, adapter_names, target_dtype, quantization_config, probe_inputs, probe_text
    )


def export_merged(
    peft_model: nn.Module,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    quantization: str | Any | None = None,
    *,
    adapter_names: Sequence[str] | None = None,
    tokenizer: Any | None = None,
    probe_inputs: Mapping[str, torch.Tensor] | None = None,
    base_name_or_path: str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
) -> ExportReport:
    """Merge orthoft adapters into a dense copy of the base model and save it as a plain HF model.

    Args:
        peft_model: a ``PeftModel`` (or a transformers model with orthoft layers injected) whose
            base may be quantized with bitsandbytes. It is left as it was (adapters, modes, grads).
        out_dir: folder to create; it must not exist unless ``overwrite``.
        dtype: dtype of the written weights, ``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype;
            default (None or ``"auto"``): the base config's dtype (float32 when it has none or names a
            quantized one).
        quantization: None writes dense weights. ``"base"`` requantizes with the base's own
            bitsandbytes config (nf4 with double quantization when the base is not quantized),
            ``"nf4"``, ``"fp4"``, ``"int8"`` or a ``transformers.BitsAndBytesConfig`` pick one.
        adapter_names: adapters to merge, in order; default: the active adapters.
        tokenizer: saved alongside; default: loaded from the base folder when it has one.
        probe_inputs: forward kwargs for the error measurement; default: a seeded batch of
            ``PROBE_SHAPE`` random token ids (needs ``config.vocab_size``).
        base_name_or_path: what the model card names as base; default: from the adapter config.
        overwrite: replace an existing ``out_dir`` (swapped in by renames once the new one is complete).
        max_shard_size: passed to ``save_pretrained``.

    Returns:
        an :class:`ExportReport` (also written to ``out_dir/orthoft_export.json`` and the model card).
    """
    plan = _plan_export(peft_model, out_dir, dtype, quantization, adapter_names, probe_inputs, overwrite)
    base_model, names = plan.base_model, plan.adapter_names
    base_device = device_of(base_model)
    with bnb_4bit_layers_exact(base_model):
        reference_logits = adapter_logits(peft_model, base_model, plan.layers, names, plan.probe_inputs)
        dense = build_dense_model(base_model, names)
    merged_logits = model_logits(dense, plan.probe_inputs)

    remove_stale_partials(plan.out_dir)
    staging = make_staging_dir(plan.out_dir)
    try:
        exported = _weights_to_write(dense, plan, base_device)
        del dense  # a requantized export no longer needs the float32 merge
        _save_model(exported, staging, max_shard_size)
        exported_logits = model_logits(exported, plan.probe_inputs)
        _save_tokenizer(tokenizer, base_model, staging)
        report = ExportReport(
            out_dir=plan.out_dir,
            base=base_name_or_path or base_name(peft_model, base_model, names),
            adapters=list(names),
            methods=adapter_methods(plan.layers, names),
            dtype=dtype_name(plan.dtype),
            quantization=quantization_dict(plan.quantization_config),
            merge_error=logit_error(merged_logits, reference_logits),
            export_error=logit_error(exported_logits, reference_logits),
            requantization_error=(
                None if plan.quantization_config is None else logit_error(exported_logits, merged_logits)
            ),
            probe=plan.probe_text,
            files=[],
        )
        _write_card_and_info(report, adapter_configs(peft_model, plan.layers, names), staging)
        sync_tree(staging)
        publish_directory(staging, plan.out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _weights_to_write(dense: nn.Module, plan: _ExportPlan, device: torch.device) -> nn.Module:
    """The model to save: ``dense`` cast to the written dtype, or requantized; NaN/inf refused either way."""
    if plan.quantization_config is None:
        dense.to(plan.dtype)
        check_finite(dense, plan.adapter_names, plan.dtype)
        return dense
    check_finite(dense, plan.adapter_names, torch.float32)
    exported = requantize(dense, plan.quantization_config, plan.dtype, plan.out_dir, device)
    check_finite(exported, plan.adapter_names, plan.dtype)
    return exported


def _save_model(model: nn.Module, staging: Path, max_shard_size: str | int) -> None:
    model.config.dtype = next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), getattr(model.config, "dtype", None)
    )
    model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)


def _save_tokenizer(tokenizer: Any | None, base_model: nn.Module, staging: Path) -> None:
    if tokenizer is None:
        source = getattr(base_model.config, "_name_or_path", "") or ""
        if not source or not Path(source).is_dir() or not any((Path(source) / f).exists() for f in _TOKENIZER_FILES):
            return  # no local tokenizer to copy; hub ids are not fetched (exports must work offline)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(staging)


def _write_card_and_info(report: ExportReport, configs: dict[str, dict], staging: Path) -> None:
    """README.md, then the file list (which names the info file itself), then ``orthoft_export.json``."""
    (staging / "README.md").write_text(model_card(report, configs), encoding="utf-8")
    report.files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    report.files.append(EXPORT_INFO_FILE)
    info = {**report.to_dict(), "adapter_configs": configs, "orthoft_version": __version__}
    (staging / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")


def _adapter_label(path: str, used: set[str]) -> str:
    label = re.sub(r"[^A-Za-z0-9_]+", "_", Path(path).name).strip("_") or "adapter"
    candidate, index = label, 1
    while candidate in used:
        index += 1
        candidate = f"{label}_{index}"
    used.add(candidate)
    return candidate


def load_for_export(
    base: str | None, adapters: Sequence[str], load_in_4bit: bool = False, device: str | None = None
) -> tuple[nn.Module, list[str]]:
    """Load ``base`` and the adapters in order as one PeftModel; returns it and the adapter names it gave them."""
    import transformers
    from peft import PeftConfig, PeftModel

    for adapter in adapters:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"orthoft export: {adapter} has no adapter_config.json. Fix: pass the folder written by "
                "PeftModel.save_pretrained (for a named adapter, its subfolder)."
            )
    if base is None:
        base = PeftConfig.from_pretrained(adapters[0]).base_model_name_or_path
        if not base:
            raise ValueError(f"orthoft export: {adapters[0]} does not record its base model. Fix: pass --base.")
    config = transformers.AutoConfig.from_pretrained(base)
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    model_cls = model_cls or transformers.AutoModel
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"device_map": {"": device}}
    if load_in_4bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32 if device == "cpu" else torch.bfloat16,
        )
    model = model_cls.from_pretrained(base, **kwargs)
    used: set[str] = set()
    names = [_adapter_label(path, used) for path in adapters]
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for path, name in zip(adapters[1:], names[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    peft_model.eval()
    return peft_model, names


__all__ = ["ExportReport", "export_merged", "load_for_export", "written_dtype"]
