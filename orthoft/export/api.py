"""``export_merged`` (adapter model -> plain Hugging Face model folder) and ``load_for_export``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import OrthoLayer
from ..io.adapter_files import adapter_load_errors, check_adapter_folder
from ..io.dtypes import DTYPES, FLOAT_DTYPES, dtype_name, resolve_dtype
from ..io.files import make_staging_dir, publish_directory, remove_stale_partials, sync_tree
from ..version import __version__
from .card import adapter_configs, adapter_methods, base_name, model_card
from .destination import check_destination, protected_inputs
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
    adapter_dirs: Sequence[str | os.PathLike],
) -> _ExportPlan:
    out_dir = Path(out_dir).absolute()
    base_model = base_model_of(peft_model)
    _check_out_dir(peft_model, base_model, out_dir, adapter_dirs, overwrite)
    layers = ortho_layers(base_model)
    if not layers:
        raise ValueError(
            f"export_merged: {type(peft_model).__name__} holds no orthoft adapter layer. "
            "Fix: pass the model returned by get_peft_model/PeftModel.from_pretrained with an orthoft config."
        )
    adapter_names = resolve_adapter_names(peft_model, layers, adapter_names)
    target_dtype = written_dtype(dtype, base_model)
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


def _check_out_dir(
    peft_model: nn.Module,
    base_model: nn.Module,
    out_dir: Path,
    adapter_dirs: Sequence[str | os.PathLike],
    overwrite: bool,
) -> None:
    """``check_destination`` against the base folders the model records and ``adapter_dirs``."""
    inputs = protected_inputs(getattr(base_model.config, "_name_or_path", None), adapter_dirs)
    for config in (getattr(peft_model, "peft_config", None) or {}).values():
        inputs += protected_inputs(getattr(config, "base_model_name_or_path", None), ())
    restored = check_destination(out_dir, inputs, overwrite, label="export_merged: out_dir")
    if restored is not None:
        warnings.warn(
            f"export_merged: {out_dir} was missing after an interrupted export; restored it from {restored.name}.",
            stacklevel=3,
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
    adapter_dirs: Sequence[str | os.PathLike] = (),
) -> ExportReport:
    """Merge orthoft adapters into a dense copy of the base model and save it as a plain HF model.

    Args:
        peft_model: a ``PeftModel`` (or a transformers model with orthoft layers injected) whose
            base may be quantized with bitsandbytes. It is left as it was (adapters, modes, grads).
        out_dir: folder to create; it must not exist unless ``overwrite``. Never the working directory
            or a parent of it, nor a folder that is or holds an input (the base model folder, an
            adapter folder, the run folder an adapter came from): refused with or without ``overwrite``.
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
        overwrite: replace an existing ``out_dir`` that an earlier export wrote (swapped in by renames
            once the new one is complete; a folder without ``orthoft_export.json`` is refused).
        max_shard_size: passed to ``save_pretrained``.
        adapter_dirs: the folders the adapters were loaded from, protected like the base folder.

    Returns:
        an :class:`ExportReport` (also written to ``out_dir/orthoft_export.json`` and the model card).
    """
    max_shard_size = shard_size(max_shard_size)
    plan = _plan_export(peft_model, out_dir, dtype, quantization, adapter_names, probe_inputs, overwrite, adapter_dirs)
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


def shard_size(max_shard_size: str | int, label: str = "export_merged: max_shard_size") -> str | int:
    """``max_shard_size`` as ``save_pretrained`` takes it (a digit string becomes bytes); refused early when invalid."""
    from transformers.utils.hub import convert_file_size_to_int

    size = int(max_shard_size) if isinstance(max_shard_size, str) and max_shard_size.isdigit() else max_shard_size
    try:
        valid = convert_file_size_to_int(size) > 0
    except (ValueError, AttributeError):
        valid = False
    if not valid:
        raise ValueError(
            f"{label} {max_shard_size!r} is not a size. Fix: a number of bytes or an integer "
            "with a unit, e.g. 2GB, 500MB, 1GiB."
        )
    return size


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


def _base_config(base: str, recorded: str | None) -> Any:
    """The base's transformers config; a missing folder or an unreachable hub id raises naming it and the fix."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:  # transformers: "not a local folder ...", no config.json, offline, bad id
        note = f" (the adapter records base {recorded!r})" if recorded and recorded != base else ""
        reason = " ".join(str(err).split())
        if not Path(base).exists():  # transformers then talks about the hub; say what the user can check first
            reason = "no such local folder, and no hub model of that id could be loaded (offline, or not cached)."
        raise FileNotFoundError(
            f"cannot load the base model {base!r}{note}: {reason[:300]} Fix: pass --base the local folder of the model "
            "the adapter was trained on."
        ) from err


def _load_base(base: str, config: Any, load_in_4bit: bool, device: str) -> nn.Module:
    import transformers
    from safetensors import SafetensorError

    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    model_cls = model_cls or transformers.AutoModel
    kwargs: dict[str, Any] = {"device_map": {"": device}}
    if load_in_4bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32 if device == "cpu" else torch.bfloat16,
        )
    try:
        return model_cls.from_pretrained(base, **kwargs)
    except (OSError, SafetensorError) as err:  # missing or corrupt weight files of the base
        raise ValueError(
            f"cannot load the weights of the base model {base!r}: {' '.join(str(err).split())[:300]} "
            "Fix: pass --base a complete model folder (re-download or re-save it)."
        ) from err


def load_for_export(
    base: str | None, adapters: Sequence[str], load_in_4bit: bool = False, device: str | None = None
) -> tuple[nn.Module, list[str]]:
    """Load ``base`` and the adapters in order as one PeftModel; returns it and the adapter names it gave them.

    Every adapter folder is checked first (config, weights header), so a missing or corrupt file, an
    unknown method or a base of the wrong shape raises one message naming the file and the fix.
    """
    from peft import PeftModel

    configs = [check_adapter_folder(adapter) for adapter in adapters]
    recorded = configs[0].get("base_model_name_or_path")
    if base is None:
        base = recorded
        if not base:
            raise ValueError(f"{adapters[0]} does not record its base model. Fix: pass --base.")
    model = _load_base(base, _base_config(base, recorded), load_in_4bit, device or _default_device())
    used: set[str] = set()
    names = [_adapter_label(path, used) for path in adapters]
    with adapter_load_errors(adapters[0], base, recorded):
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for path, name, config in zip(adapters[1:], names[1:], configs[1:]):
        with adapter_load_errors(path, base, config.get("base_model_name_or_path")):
            peft_model.load_adapter(path, adapter_name=name)
    peft_model.eval()
    return peft_model, names


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["ExportReport", "export_merged", "load_for_export", "written_dtype"]
