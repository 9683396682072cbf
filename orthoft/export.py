"""Merge orthoft adapters into a plain Hugging Face model for deployment: ``export_merged`` and ``orthoft export``.

The exported folder loads with ``AutoModel*.from_pretrained`` and needs neither orthoft nor PEFT.

How the merge is done, and why:

* A fresh dense model is built from the base's config (quantization settings removed). Every
  adapted layer contributes ``layer.merged_weight(name, layer.dense_base_weight())`` for each
  exported adapter in order: the layer's own float32 math on the exactly dequantized base weight.
  Quantized layers that carry no adapter are dequantized. Nothing is written into a 4-bit layer,
  because that would requantize the merged weight and hide the rounding in the model.
* With ``quantization`` (CLI ``--requantize``) the dense merge is quantized again with
  bitsandbytes and saved in that format; the error this adds is measured and reported.
* The export is measured, not assumed: logits of the adapter model and of the exported model on
  a probe batch, written to the model card (README.md) and ``orthoft_export.json``.
* Writes are atomic: everything goes to a hidden temporary folder next to ``out_dir``, files and
  folder are fsynced, then the folder is renamed. A crash or a full disk leaves no half-written
  model at ``out_dir`` (a stale ``.NAME.partial-PID-*`` folder at most, removed by the next export
  once its process is gone). Tensors with NaN/inf are refused before anything is written.
* Several adapters merge in the stated order: ``W -> W T1^T -> W T1^T T2^T``; products of
  rotations stay orthogonal. The adapter model is probed with the same adapters active in the
  same order, so the measured error covers the composition.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters.base import OrthoLayer, keep_bnb_4bit_unpacked

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
QUANTIZATIONS = ("base", "nf4", "fp4", "int8")
PROBE_SHAPE = (2, 32)
PROBE_SEED = 0
EXPORT_INFO_FILE = "orthoft_export.json"

# Test hook: called with each file's path right after it is fsynced inside the staging folder,
# so tests can crash an export part-way. Never set outside tests.
_after_file_synced: Callable[[Path], None] | None = None


@dataclasses.dataclass
class ExportReport:
    """What ``export_merged`` wrote and how far the exported model is from the adapter model.

    Each error entry holds ``max_abs``, ``mean_abs``, ``relative_max`` (max_abs / max |reference|)
    and ``relative_mean`` (mean_abs / mean |reference|) over the probe batch's logits.

    * ``merge_error``: dense float32 merge vs the adapter model (the merge itself).
    * ``export_error``: the model as written (``dtype``, requantized if asked) vs the adapter model.
    * ``requantization_error``: requantized export vs the dense float32 merge (what requantizing
      adds); None without ``quantization``.
    """

    out_dir: Path
    base: str
    adapters: list[str]
    methods: dict[str, str]
    dtype: str
    quantization: dict[str, Any] | None
    merge_error: dict[str, float]
    export_error: dict[str, float]
    requantization_error: dict[str, float] | None
    probe: str
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


# ---- public API -----------------------------------------------------------------------------


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
            default: the base config's dtype (float32 when it has none or names a quantized one).
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
    out_dir = Path(out_dir).absolute()
    base_model = _base_model(peft_model)
    layers = _ortho_layers(base_model)
    if not layers:
        raise ValueError(
            f"export_merged: {type(peft_model).__name__} holds no orthoft adapter layer. "
            "Fix: pass the model returned by get_peft_model/PeftModel.from_pretrained with an orthoft config."
        )
    adapter_names = _resolve_adapter_names(peft_model, layers, adapter_names)
    target_dtype = _resolve_dtype(dtype, base_model)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"export_merged: {out_dir} already exists. Fix: choose a new out_dir or pass overwrite=True."
        )
    quantization_config = _resolve_quantization(quantization, base_model, target_dtype)
    if probe_inputs is None:
        probe_inputs = _default_probe(base_model)
        probe_text = f"{PROBE_SHAPE[0]} x {PROBE_SHAPE[1]} random token ids, seed {PROBE_SEED}"
    else:
        probe_inputs = dict(probe_inputs)
        probe_text = "given inputs " + _describe_probe(probe_inputs)

    base_device = _device_of(base_model)
    with _bnb_4bit_layers_exact(base_model):
        reference_logits = _adapter_logits(peft_model, base_model, layers, adapter_names, probe_inputs)
        dense = _build_dense_model(base_model, adapter_names)
    merged_logits = _logits(dense, probe_inputs)
    merge_error = _logit_error(merged_logits, reference_logits)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    try:
        requantization_error = None
        if quantization_config is None:
            dense.to(target_dtype)
            _check_finite(dense, adapter_names, target_dtype)
            exported = dense
            _save_model(exported, staging, max_shard_size)
        else:
            _check_finite(dense, adapter_names, torch.float32)
            scratch_prefix = f".{out_dir.name}.partial-{os.getpid()}-dense-"
            exported = _requantize(
                dense, quantization_config, target_dtype, out_dir.parent, scratch_prefix, base_device
            )
            del dense
            _check_finite(exported, adapter_names, target_dtype)
            _save_model(exported, staging, max_shard_size)
        exported_logits = _logits(exported, probe_inputs)
        export_error = _logit_error(exported_logits, reference_logits)
        if quantization_config is not None:
            requantization_error = _logit_error(exported_logits, merged_logits)
        _save_tokenizer(tokenizer, peft_model, base_model, staging)

        report = ExportReport(
            out_dir=out_dir,
            base=base_name_or_path or _base_name(peft_model, base_model, adapter_names),
            adapters=list(adapter_names),
            methods=_methods(peft_model, layers, adapter_names),
            dtype=str(target_dtype).removeprefix("torch."),
            quantization=_quantization_dict(quantization_config),
            merge_error=merge_error,
            export_error=export_error,
            requantization_error=requantization_error,
            probe=probe_text,
            files=[],
        )
        configs = _adapter_configs(peft_model, layers, adapter_names)
        (staging / "README.md").write_text(_model_card(report, configs), encoding="utf-8")
        report.files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        report.files.append(EXPORT_INFO_FILE)
        info = {**report.to_dict(), "adapter_configs": configs, "orthoft_version": _orthoft_version()}
        (staging / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        _sync_tree(staging)
        _publish(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


# ---- the model and its adapters ---------------------------------------------------------------


def _base_model(peft_model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself when adapters were injected)."""
    get_base = getattr(peft_model, "get_base_model", None)
    base = get_base() if callable(get_base) else peft_model
    if not hasattr(base, "config") or not hasattr(base, "save_pretrained"):
        raise TypeError(
            f"export_merged: the base model is a {type(base).__name__}, not a transformers PreTrainedModel. "
            "Fix: export models loaded with transformers (diffusers and plain nn.Modules are not supported)."
        )
    return base


def _ortho_layers(model: nn.Module) -> dict[str, OrthoLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, OrthoLayer)}


def _resolve_adapter_names(
    peft_model: nn.Module, layers: dict[str, OrthoLayer], adapter_names: Sequence[str] | None
) -> list[str]:
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


def _resolve_dtype(dtype: str | torch.dtype | None, base_model: nn.Module) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"export_merged: dtype {dtype} is not a float dtype. Fix: use one of fp32, bf16, fp16.")
        return dtype
    if dtype is None:
        config_dtype = getattr(base_model.config, "dtype", None) or getattr(base_model.config, "torch_dtype", None)
        if isinstance(config_dtype, str):
            config_dtype = DTYPES.get(config_dtype.removeprefix("torch."))
        return config_dtype if config_dtype in DTYPES.values() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"export_merged: dtype {dtype!r} is not known. Fix: use one of fp32, bf16, fp16.")
    return DTYPES[dtype]


def _base_quantization_config(base_model: nn.Module) -> Any | None:
    config = getattr(base_model.config, "quantization_config", None)
    if config is None:
        return None
    from transformers import BitsAndBytesConfig

    if isinstance(config, dict):
        if config.get("quant_method") != "bitsandbytes":
            return config
        config = BitsAndBytesConfig.from_dict(config)
    return config


def _resolve_quantization(quantization: str | Any | None, base_model: nn.Module, dtype: torch.dtype) -> Any | None:
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
        config = _base_quantization_config(base_model)
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


def _quantization_dict(config: Any | None) -> dict[str, Any] | None:
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: str(value) if isinstance(value, torch.dtype) else value for key, value in data.items()}


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


# ---- probing ----------------------------------------------------------------------------------


def _default_probe(base_model: nn.Module) -> dict[str, torch.Tensor]:
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


def _describe_probe(probe_inputs: Mapping[str, Any]) -> str:
    parts = []
    for key, value in probe_inputs.items():
        parts.append(f"{key} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"{key}={value!r}")
    return ", ".join(parts)


def _logits(model: nn.Module, probe_inputs: Mapping[str, Any]) -> torch.Tensor:
    device = _device_of(model)
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


def _logit_error(actual: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
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
def _bnb_4bit_layers_exact(base_model: nn.Module) -> Iterator:
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
def _only_adapters_active(base_model: nn.Module, layers: dict[str, OrthoLayer], adapter_names: list[str]) -> Iterator:
    """Activate exactly ``adapter_names`` (in order) everywhere, restoring every layer afterwards.

    Sets the layers' active list directly rather than through ``set_adapter``, which would also
    flip ``requires_grad`` on the user's parameters.
    """
    from peft.utils.other import ModulesToSaveWrapper

    saved: list[tuple[nn.Module, Any, bool | None]] = []
    try:
        for layer in layers.values():
            saved.append((layer, layer._active_adapter, layer._disable_adapters))
            layer._active_adapter = [name for name in adapter_names if layer.has_adapter(name)]
            layer._disable_adapters = False
        for module_name, wrapper in base_model.named_modules():
            if isinstance(wrapper, ModulesToSaveWrapper):
                saved.append((wrapper, wrapper._active_adapter, None))
                chosen = _modules_to_save_choice(module_name, wrapper, adapter_names)
                wrapper._active_adapter = [chosen] if chosen else []
        yield
    finally:
        for module, active, disabled in saved:
            module._active_adapter = active
            if disabled is not None:
                module._disable_adapters = disabled


def _adapter_logits(
    peft_model: nn.Module,
    base_model: nn.Module,
    layers: dict[str, OrthoLayer],
    adapter_names: list[str],
    probe_inputs: Mapping[str, Any],
) -> torch.Tensor:
    with _only_adapters_active(base_model, layers, adapter_names):
        return _logits(peft_model, probe_inputs)


# ---- the dense merge ----------------------------------------------------------------------------


def _modules_to_save_choice(module_name: str, wrapper: nn.Module, adapter_names: list[str]) -> str | None:
    trained = [name for name in adapter_names if name in wrapper.modules_to_save]
    if len(trained) > 1:
        raise ValueError(
            f"export_merged: adapters {trained} each train their own copy of {module_name} (modules_to_save); "
            "full copies cannot be combined. Fix: export those adapters separately."
        )
    return trained[0] if trained else None


def _resolve_module(root: nn.Module, path: str, adapter_names: list[str]) -> nn.Module:
    """The module at ``path`` of the adapted model, looking through PEFT's modules_to_save wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    module = root
    walked = []
    for part in path.split(".") if path else []:
        module = getattr(module, part)
        walked.append(part)
        if isinstance(module, ModulesToSaveWrapper):
            chosen = _modules_to_save_choice(".".join(walked), module, adapter_names)
            module = module.modules_to_save[chosen] if chosen else module.original_module
        elif isinstance(module, AuxiliaryTrainingWrapper) or (
            isinstance(module, BaseTunerLayer) and not isinstance(module, OrthoLayer)
        ):
            raise TypeError(
                f"export_merged: {'.'.join(walked)} is a {type(module).__name__}, not an orthoft layer. "
                "Fix: merge_and_unload() the other PEFT method first, or export without it."
            )
    return module


def _merged_dense_weight(layer: OrthoLayer, adapter_names: list[str]) -> torch.Tensor:
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
            return _merged_dense_weight(module, adapter_names)
        module = module.get_base_layer()
    backend = resolve_quantization_backend(module)
    if backend is not None and attr == "weight":
        return backend.get_base_weight(module).float()
    return getattr(module, attr)


@contextlib.contextmanager
def _no_weight_init() -> Iterator:
    """Skip random initialization of the fresh model (every tensor is overwritten) and keep the RNG as it was."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with torch.random.fork_rng(devices=[]), no_init_weights():
        yield


def _dense_config(base_model: nn.Module) -> Any:
    config = copy.deepcopy(base_model.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        config.__dict__.pop(key, None)
    return config


def _build_dense_model(base_model: nn.Module, adapter_names: list[str]) -> nn.Module:
    """A fresh float32 copy of the base architecture holding the merged weights, on CPU."""
    config = _dense_config(base_model)
    with _no_weight_init():
        dense = type(base_model)._from_config(config, dtype=torch.float32)
    dense.eval()
    generation_config = getattr(base_model, "generation_config", None)
    if generation_config is not None:
        dense.generation_config = copy.deepcopy(generation_config)

    written: dict[int, tuple[str, torch.Tensor]] = {}
    merged_cache: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for full_name, target in dense.named_parameters(remove_duplicate=False):
            path, _, attr = full_name.rpartition(".")
            source_module = _resolve_module(base_model, path, adapter_names)
            if isinstance(source_module, OrthoLayer) and attr == "weight":
                key = id(source_module)
                if key not in merged_cache:
                    merged_cache[key] = _merged_dense_weight(source_module, adapter_names)
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
        for full_name, buffer in dense.named_buffers():
            path, _, attr = full_name.rpartition(".")
            source_module = _resolve_module(base_model, path, adapter_names)
            source = getattr(source_module, attr, None)
            if isinstance(source, torch.Tensor) and source.shape == buffer.shape and source.device.type != "meta":
                buffer.copy_(source.detach().to(device="cpu", dtype=buffer.dtype))
    return dense


def _check_finite(model: nn.Module, adapter_names: list[str], dtype: torch.dtype) -> None:
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


def _requantize(
    dense: nn.Module,
    quantization_config: Any,
    dtype: torch.dtype,
    scratch_parent: Path,
    scratch_prefix: str,
    device: torch.device,
) -> nn.Module:
    """Quantize the dense merge with transformers' own bitsandbytes loader (the format a user would load).

    The dense weights pass through a scratch folder named like a staging folder, so a crash
    leaves nothing that the next export would not clean up.
    """
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix, dir=scratch_parent))
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


# ---- writing --------------------------------------------------------------------------------------


def _save_model(model: nn.Module, staging: Path, max_shard_size: str | int) -> None:
    model.config.dtype = next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), getattr(model.config, "dtype", None)
    )
    model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


def _save_tokenizer(tokenizer: Any | None, peft_model: nn.Module, base_model: nn.Module, staging: Path) -> None:
    if tokenizer is None:
        source = getattr(base_model.config, "_name_or_path", "") or ""
        if not source or not Path(source).is_dir() or not any((Path(source) / f).exists() for f in _TOKENIZER_FILES):
            return  # no local tokenizer to copy; hub ids are not fetched (exports must work offline)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(staging)


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            _fsync_path(path)
            if _after_file_synced is not None:
                _after_file_synced(path)
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_path(path, directory=True)
    _fsync_path(root, directory=True)


def _publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the complete staging folder to ``out_dir``; an old ``out_dir`` is swapped out first."""
    old = None
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"export_merged: {out_dir} appeared while exporting. Fix: choose a new out_dir.")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
        os.rmdir(old)
        os.rename(out_dir, old)
    os.rename(staging, out_dir)
    _fsync_path(out_dir.parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True


def _remove_stale_partials(out_dir: Path) -> None:
    """Delete temporary folders of earlier exports to the same place whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(partial|old)-(\d+)-")
    for candidate in out_dir.parent.iterdir():
        match = pattern.match(candidate.name)
        if match and candidate.is_dir() and not _pid_alive(int(match.group(2))):
            shutil.rmtree(candidate, ignore_errors=True)


# ---- model card ---------------------------------------------------------------------------------


def _orthoft_version() -> str:
    from . import __version__

    return __version__


def _peft_configs(peft_model: nn.Module) -> Mapping[str, Any]:
    return getattr(peft_model, "peft_config", None) or {}


def _adapter_configs(peft_model: nn.Module, layers: dict[str, OrthoLayer], adapter_names: list[str]) -> dict:
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


def _methods(peft_model: nn.Module, layers: dict[str, OrthoLayer], adapter_names: list[str]) -> dict[str, str]:
    methods = {}
    for name in adapter_names:
        layer = next(layer for layer in layers.values() if layer.has_adapter(name))
        methods[name] = layer.method_name
    return methods


def _base_name(peft_model: nn.Module, base_model: nn.Module, adapter_names: list[str]) -> str:
    config = _peft_configs(peft_model).get(adapter_names[0])
    name = getattr(config, "base_model_name_or_path", None) or getattr(base_model.config, "_name_or_path", "")
    return str(name) or "unknown"


def _format_error(error: dict[str, float] | None) -> str:
    if error is None:
        return "n/a"
    return (
        f"max {error['max_abs']:.3e} (relative {error['relative_max']:.3e}), "
        f"mean {error['mean_abs']:.3e} (relative {error['relative_mean']:.3e})"
    )


def _model_card(report: ExportReport, configs: dict[str, dict]) -> str:
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
        "| comparison | error |",
        "| --- | --- |",
        f"| float32 merge vs adapter model | {_format_error(report.merge_error)} |",
        f"| this export as written vs adapter model | {_format_error(report.export_error)} |",
    ]
    if report.requantization_error is not None:
        lines.append(
            f"| added by requantization (export vs float32 merge) | {_format_error(report.requantization_error)} |"
        )
    lines += [
        "",
        "## Provenance",
        "",
        f"- orthoft version: {_orthoft_version()}",
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


# ---- command line -------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``orthoft export``: merge saved orthoft adapters into their base and write a plain HF model."""
    parser = subparsers.add_parser(
        "export",
        help="merge orthoft adapters into the base model and write a plain Hugging Face model folder",
        description=(
            "Load BASE (optionally in 4-bit), load each ADAPTER in the given order, merge them exactly in float32 "
            "into a dense copy of the base and write OUT atomically, with a model card recording the measured "
            "merge error."
        ),
    )
    parser.add_argument(
        "--base", help="base model folder or hub id (default: the first adapter's base_model_name_or_path)"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        help="saved orthoft adapter folder; repeat to merge several in order",
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="written dtype (default: base's)"
    )
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="keep the base's bitsandbytes format (nf4 when the base is dense) and report the error this adds",
    )
    parser.add_argument("--load-in-4bit", action="store_true", help="load BASE in 4-bit nf4 (as it was trained)")
    parser.add_argument(
        "--device", default=None, help="device to load the base on (default: cuda if available, else cpu)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.set_defaults(func=run_export_command)
    return parser


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


def run_export_command(args: argparse.Namespace) -> int:
    peft_model, names = load_for_export(args.base, args.adapter, args.load_in_4bit, args.device)
    report = export_merged(
        peft_model,
        args.out,
        dtype=args.dtype,
        quantization="base" if args.requantize else None,
        adapter_names=names,
        base_name_or_path=args.base,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    print(f"wrote {report.out_dir} ({', '.join(f'{n}: {report.methods[n]}' for n in report.adapters)})")
    print(f"merge error (float32 merge vs adapter model): {_format_error(report.merge_error)}")
    print(f"export error (as written vs adapter model):   {_format_error(report.export_error)}")
    if report.requantization_error is not None:
        print(f"added by requantization:                      {_format_error(report.requantization_error)}")
    return 0


__all__ = ["ExportReport", "add_parser", "export_merged", "load_for_export"]
