"""diffusers' LoRA entry points, made to refuse orthoft adapters by name instead of loading nothing.

What diffusers 0.42 does with an orthoft adapter folder (``adapter_config.json`` with
``peft_type: ORTHOFT_*``, tensors named ``...to_q.orthoft_oft_Q``), measured on the tiny pipeline:

* ``pipe.load_lora_weights(folder)``: ``ValueError: Invalid LoRA checkpoint. Make sure all LoRA param
  names contain 'lora' substring``, which does not say what the folder is or what loads it;
* ``unet.load_lora_adapter(folder)``: ``OSError: no file named pytorch_lora_weights.bin``; with
  ``weight_name="adapter_model.safetensors"`` it logs that no key matched the prefix and returns
  having loaded **nothing** (silently sampling the base model); with ``prefix=None``, ``IndexError``;
* ``unet.load_attn_procs(folder)``: ``OSError`` as above, or "not in the format expected by Custom
  Diffusion training".

``install()`` (run by ``import orthoft.diffusion``) wraps these methods once: before calling
diffusers' original, the wrapper looks at what it was given (a local folder or weights file: its
``adapter_config.json`` and safetensors header; a state dict: its keys; for a model's
``load_lora_adapter`` with a hub id: the repository's ``adapter_config.json``, if it has one) and
raises ``ValueError`` naming ``orthoft.diffusion.load_adapter`` when it is an orthoft adapter.
``lora_state_dict`` also checks the state dict it fetched (so hub ids given to a pipeline are
caught after the download). Anything else reaches diffusers' original unchanged.

Once loaded (with ``orthoft.diffusion.load_adapter``), orthoft adapters are ordinary PEFT tuner
layers, and diffusers' pipeline switches that act on any such layer work on them as on LoRA
(``pipe.disable_lora()`` / ``enable_lora()``, ``fuse_lora()``, ``unload_lora_weights()``). A model's
``set_adapters`` (which ``pipe.set_adapters`` calls) sets LoRA scales, which orthoft layers do not
have (diffusers fails with ``AttributeError: 'OFTLayer' object has no attribute 'set_scale'``): it is
guarded too and names ``orthoft.diffusion.set_adapters``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import diffusers.loaders.lora_pipeline  # noqa: F401  (defines the pipeline LoRA mixins that install() walks)
import huggingface_hub
from diffusers.loaders import PeftAdapterMixin, UNet2DConditionLoadersMixin
from diffusers.loaders.lora_base import LoraBaseMixin
from safetensors import SafetensorError, safe_open

from ..adapters.registry import PEFT_TYPE_PREFIX, REGISTERED
from ..io.adapter_files import ADAPTER_CONFIG

LOAD_CALL = "orthoft.diffusion.load_adapter(pipe, path)"
GUARD_MARK = "orthoft_guard"  # attribute set on every wrapper, so installing twice wraps nothing twice


def _config_type(config_file: Path) -> str | None:
    """The orthoft PEFT type recorded in ``config_file``; None when absent, unreadable or another method."""
    try:
        peft_type = json.loads(config_file.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None  # not ours to judge: diffusers reports its own error on such a folder
    return str(peft_type) if str(peft_type).startswith(PEFT_TYPE_PREFIX) else None


def keys_type(keys: Iterable[str]) -> str | None:
    """The orthoft PEFT type whose tensor prefix (``orthoft_oft_``, ...) a key carries; None if no key does."""
    prefixes = {tuner.prefix: peft_type for peft_type, (_, tuner) in REGISTERED.items()}
    for key in keys:
        for part in str(key).split("."):
            for prefix, peft_type in prefixes.items():
                if part.startswith(prefix):
                    return peft_type
    return None


def orthoft_adapter_type(source: Any, subfolder: str | None = None, weight_name: str | None = None) -> str | None:
    """The orthoft PEFT type of a local adapter folder, weights file or state dict; None for anything else."""
    if isinstance(source, Mapping):
        return keys_type(source)
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source) / subfolder if subfolder else Path(source)
    if path.is_file():
        folder, weights = path.parent, path
    elif path.is_dir():
        folder, weights = path, (path / weight_name if weight_name else None)
    else:
        return None
    found = _config_type(folder / ADAPTER_CONFIG)
    if found is None and weights is None:
        # several adapters saved together: each in a subfolder named after it
        found = next(filter(None, (_config_type(p) for p in sorted(folder.glob(f"*/{ADAPTER_CONFIG}")))), None)
    if found is None and weights is not None and weights.suffix == ".safetensors" and weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as handle:  # the header only, no tensor is read
                found = keys_type(handle.keys())
        except (OSError, SafetensorError):
            return None
    return found


def hub_adapter_type(repo_id: str, options: Mapping[str, Any]) -> str | None:
    """The orthoft PEFT type in a hub repository's ``adapter_config.json``; None if it has none or is unreachable."""
    if repo_id.count("/") != 1 or os.path.exists(repo_id):
        return None
    try:
        config_file = huggingface_hub.hf_hub_download(
            repo_id,
            ADAPTER_CONFIG,
            subfolder=options.get("subfolder") or None,
            revision=options.get("revision"),
            cache_dir=options.get("cache_dir"),
            token=options.get("token"),
            local_files_only=bool(options.get("local_files_only")),
        )
    except Exception:  # a best-effort look (offline, no such file, no access, network error): diffusers decides
        return None
    return _config_type(Path(config_file))


def refusal(source: Any, peft_type: str, entry: str) -> ValueError:
    what = "this state dict" if isinstance(source, Mapping) else str(source)
    return ValueError(
        f"{what} is an orthoft adapter ({peft_type}), not a LoRA: diffusers' {entry} reads only LoRA weights. "
        f"Fix: load it with {LOAD_CALL} (into pipe.unet, or pipe.transformer in DiT pipelines)."
    )


def source_of(args: tuple, kwargs: Mapping[str, Any]) -> Any:
    """The checkpoint argument of a diffusers loader, given by position or by keyword."""
    return args[0] if args else kwargs.get("pretrained_model_name_or_path_or_dict")


def check(source: Any, kwargs: Mapping[str, Any], entry: str, ask_hub: bool = False) -> None:
    """Raise ``refusal`` when ``source`` is an orthoft adapter (local or state dict; the hub if ``ask_hub``)."""
    found = orthoft_adapter_type(source, kwargs.get("subfolder"), kwargs.get("weight_name"))
    if found is None and ask_hub and isinstance(source, str):
        found = hub_adapter_type(source, kwargs)
    if found is not None:
        raise refusal(source, found, entry)


def guard_method(original: Callable, entry: str, ask_hub: bool = False) -> Callable:
    """``original(self, source, ...)`` preceded by ``check``."""

    @functools.wraps(original)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        check(source_of(args, kwargs), kwargs, entry, ask_hub)
        return original(self, *args, **kwargs)

    setattr(guarded, GUARD_MARK, True)
    return guarded


def guard_state_dict_method(original: Callable, entry: str) -> Callable:
    """The classmethod ``lora_state_dict``: ``check`` before, and a look at the fetched keys after."""

    @functools.wraps(original)
    def guarded(cls: type, *args: Any, **kwargs: Any) -> Any:
        source = source_of(args, kwargs)
        check(source, kwargs, entry)
        result = original(cls, *args, **kwargs)
        state_dict = result[0] if isinstance(result, tuple) else result
        found = keys_type(state_dict) if isinstance(state_dict, Mapping) else None
        if found is not None:
            raise refusal(source, found, entry)
        return result

    setattr(guarded, GUARD_MARK, True)
    return guarded


def guard_set_adapters(original: Callable) -> Callable:
    """A model's ``set_adapters`` (which sets LoRA scales): refused for orthoft adapters, naming orthoft's."""

    @functools.wraps(original)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        names = args[0] if args else kwargs.get("adapter_names")
        names = [names] if isinstance(names, str) else list(names or [])
        loaded = getattr(self, "peft_config", {})
        found = {n: str(loaded[n].peft_type) for n in names if n in loaded}
        ours = {n: t for n, t in found.items() if t.startswith(PEFT_TYPE_PREFIX)}
        if ours:
            raise ValueError(
                f"{type(self).__name__}: adapters {ours} are orthoft adapters; diffusers' set_adapters sets LoRA "
                "scales, which they do not have. Fix: orthoft.diffusion.set_adapters(pipe, names) (with "
                "orthoft.diffusion.adapters_disabled(pipe) to run without them)."
            )
        return original(self, *args, **kwargs)

    setattr(guarded, GUARD_MARK, True)
    return guarded


def lora_loader_classes() -> list[type]:
    """Every diffusers pipeline LoRA mixin (``StableDiffusionLoraLoaderMixin``, ``FluxLoraLoaderMixin``, ...)."""
    found, pending = [], [LoraBaseMixin]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.append(sub)
                pending.append(sub)
    return found


def install() -> int:
    """Wrap diffusers' LoRA loaders (idempotent); returns how many methods were wrapped now."""
    wrapped = 0
    for cls in lora_loader_classes():
        own = vars(cls)
        if "load_lora_weights" in own and not hasattr(own["load_lora_weights"], GUARD_MARK):
            cls.load_lora_weights = guard_method(own["load_lora_weights"], f"{cls.__name__}.load_lora_weights")
            wrapped += 1
        method = own.get("lora_state_dict")
        if isinstance(method, classmethod) and not hasattr(method.__func__, GUARD_MARK):
            entry = f"{cls.__name__}.lora_state_dict"
            cls.lora_state_dict = classmethod(guard_state_dict_method(method.__func__, entry))
            wrapped += 1
    for cls, name in ((PeftAdapterMixin, "load_lora_adapter"), (UNet2DConditionLoadersMixin, "load_attn_procs")):
        method = vars(cls).get(name)  # absent from older diffusers (pyproject allows >=0.30)
        if method is not None and not hasattr(method, GUARD_MARK):
            setattr(cls, name, guard_method(method, f"{cls.__name__}.{name}", ask_hub=True))
            wrapped += 1
    # a pipeline's set_adapters ends in each model's, so guarding the model's covers both
    method = vars(PeftAdapterMixin).get("set_adapters")
    if method is not None and not hasattr(method, GUARD_MARK):
        PeftAdapterMixin.set_adapters = guard_set_adapters(method)
        wrapped += 1
    return wrapped


__all__ = ["LOAD_CALL", "install", "keys_type", "lora_loader_classes", "orthoft_adapter_type"]
