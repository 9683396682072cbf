"""Orthoft adapters in any diffusers pipeline: load, save, switch, disable, merge.

diffusers' own loaders (``pipe.load_lora_weights``, ``unet.load_lora_adapter``) read only LoRA
weights, so orthoft adapters are loaded with these functions instead::

    import orthoft.diffusion as od

    pipe = DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    od.load_adapter(pipe, "runs/sd15-dog-oft/adapter")                   # into pipe.unet, active
    image = pipe("a photo of sks dog").images[0]
    od.load_adapter(pipe, "runs/sd15-hat-boft/adapter", adapter_name="hat")  # now "hat" alone is active
    od.set_adapters(pipe, ["default", "hat"])                              # both, in this order
    with od.adapters_disabled(pipe):
        base_image = pipe("a photo of a dog").images[0]
    od.save_adapter(pipe, "my-adapters")        # "default" in my-adapters/, "hat" in my-adapters/hat/
    od.merge_adapters(pipe)                     # fold the active adapters in, remove every adapter module
    od.export_pipeline(pipe, "merged")          # plain diffusers folder, no orthoft needed to load it

The adapter goes into the pipeline's denoiser: ``pipe.unet`` or, for DiT-style pipelines
(PixArt, SD3, Flux, ...), ``pipe.transformer``; ``component=`` names another ``nn.Module``
component (e.g. ``"prior"``). A bare model (a UNet) works in place of the pipeline.

The state lives in the model itself, as with diffusers' LoRA loading (PEFT's ``peft.functional``
integration API): the adapter layers and ``model.peft_config``. So these functions also act on
adapters trained in place by ``orthoft.diffusion.finetune_adapter`` or ``get_peft_model``, and an
adapter folder from ``PeftModel.save_pretrained`` loads here exactly as one from ``save_adapter``
(and vice versa: ``PeftModel.from_pretrained(unet, folder)`` reads ``save_adapter``'s folders).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffusers import DiffusionPipeline
from peft import PeftConfig
from peft.functional import (
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_adapter,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import load_peft_weights
from safetensors.torch import save_file
from torch import nn

from ..io.adapter_files import SAFETENSORS_WEIGHTS, adapter_load_errors, check_adapter_folder
from ..io.files import staged_directory

# the denoiser components tried in order when no component is named
DENOISER_COMPONENTS = ("unet", "transformer")
# PeftModel.save_pretrained writes keys under this prefix; keeping it lets either loader read either folder
PEFT_MODEL_PREFIX = "base_model.model."


def adapter_component(pipe: DiffusionPipeline | nn.Module, component: str | None = None) -> tuple[str, nn.Module]:
    """(name, module) of the model an adapter goes into: ``component``, else ``unet``, else ``transformer``."""
    if isinstance(pipe, nn.Module):
        if component is not None:
            raise ValueError(f"component={component!r} names a pipeline part, but a {type(pipe).__name__} was given.")
        return type(pipe).__name__, pipe
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, nn.Module)}
    if component is None:
        component = next((name for name in DENOISER_COMPONENTS if name in modules), None)
        if component is None:
            raise ValueError(
                f"{type(pipe).__name__} has no unet or transformer. Fix: pass component= one of {sorted(modules)}."
            )
    if component not in modules:
        raise ValueError(
            f"{type(pipe).__name__} has no model component {component!r}. Fix: pass component= one of "
            f"{sorted(modules)}."
        )
    return component, modules[component]


def list_adapters(pipe: DiffusionPipeline | nn.Module, component: str | None = None) -> dict[str, str]:
    """Adapter name -> PEFT type (``ORTHOFT_OFT``, ...) of every adapter loaded into the component."""
    _, model = adapter_component(pipe, component)
    return {name: str(config.peft_type) for name, config in getattr(model, "peft_config", {}).items()}


def active_adapters(pipe: DiffusionPipeline | nn.Module, component: str | None = None) -> list[str]:
    """The adapters that take part in the forward pass, in the order they compose."""
    _, model = adapter_component(pipe, component)
    layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    return [] if layer is None else list(layer.active_adapters)


def load_adapter(
    pipe: DiffusionPipeline | nn.Module,
    path: str | Path,
    adapter_name: str = "default",
    component: str | None = None,
    activate: bool = True,
    trainable: bool = False,
) -> str:
    """Load the orthoft (or any PEFT) adapter saved in the folder ``path`` into the pipeline's denoiser, in place.

    Args:
        pipe: a diffusers pipeline, or the model itself.
        path: a folder written by ``save_adapter`` or ``PeftModel.save_pretrained`` (``adapter_config.json``
            and ``adapter_model.safetensors``; a non-default adapter is saved in a subfolder named after it).
        adapter_name: the name to load it under; a name already loaded is refused.
        component: ``"unet"`` / ``"transformer"`` / another model component; default: the one the pipeline has.
        activate: make this adapter the only active one (as diffusers does with a newly loaded LoRA); with
            False, the active set stays as it was (a first adapter is active either way).
        trainable: leave the adapter's tensors trainable (default: frozen, for inference).

    Returns ``adapter_name``. Raises FileNotFoundError/ValueError naming the folder and the fix when the
    folder is incomplete or corrupt, or its adapter does not fit this model.
    """
    name, model = adapter_component(pipe, component)
    where = f"{type(pipe).__name__}.{name}" if isinstance(pipe, DiffusionPipeline) else name
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(
            f"load_adapter: {folder} does not exist. Fix: pass a local adapter folder (for a Hugging Face hub "
            "repository, download it first with huggingface_hub.snapshot_download)."
        )
    check_adapter_folder(folder)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(
            f"load_adapter: {where} already holds an adapter named {adapter_name!r}. Fix: pass another "
            f"adapter_name=, or delete_adapter(pipe, {adapter_name!r}) first."
        )
    previous = active_adapters(model)
    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = not trainable  # PEFT freezes the injected tensors in inference mode
    state = {
        key.removeprefix(PEFT_MODEL_PREFIX): value
        for key, value in load_peft_weights(str(folder), device="cpu").items()
    }
    try:
        with warnings.catch_warnings():
            # a second adapter is intended here; PEFT warns whenever a model already has a peft_config
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
        with adapter_load_errors(folder, where):
            result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        missing = sorted(set(get_peft_model_state_dict(model, adapter_name=adapter_name)) - set(state))
        if result.unexpected_keys or missing:
            keys = result.unexpected_keys or missing
            raise ValueError(
                f"load_adapter: {folder} does not fit {where}: {len(keys)} adapter tensor(s) "
                f"{'unknown to' if result.unexpected_keys else 'missing for'} this model, first {keys[0]!r}. Fix: "
                "load it into the pipeline (and component=) it was trained on."
            )
    except BaseException:
        _discard_adapter(model, adapter_name)  # a failed load leaves the model as it was
        raise
    set_adapter(model, [adapter_name] if activate else previous or [adapter_name], inference_mode=not trainable)
    return adapter_name


def _discard_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from ``model``; layers left without any adapter get their base layer back."""
    layers = [(key, m) for key, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for _, layer in layers:
        layer.delete_adapter(adapter_name)
    getattr(model, "peft_config", {}).pop(adapter_name, None)
    empty = [(key, layer) for key, layer in layers if not any(getattr(layer, n) for n in layer.adapter_layer_names)]
    _unwrap_layers(model, empty)


def _unwrap_layers(model: nn.Module, layers: list[tuple[str, BaseTunerLayer]]) -> None:
    """Put each layer's base layer back in its place; with no adapter layer left, drop PEFT's bookkeeping too."""
    for key, layer in layers:
        parent, _, child = key.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return
    # with these left, plain diffusers (and its save_pretrained) would expect adapters
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in vars(model):
            delattr(model, attribute)


def save_adapter(
    pipe: DiffusionPipeline | nn.Module,
    path: str | Path,
    adapter_names: list[str] | None = None,
    component: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the component's adapters (all, or ``adapter_names``) the way ``PeftModel.save_pretrained`` does.

    ``default`` goes into ``path`` itself and every other adapter into ``path/<name>/``; each folder
    holds ``adapter_config.json`` and ``adapter_model.safetensors`` and loads with ``load_adapter``
    or ``PeftModel.from_pretrained``. The write is staged (``path`` appears complete or not at all);
    an existing ``path`` is refused unless ``overwrite=True``.
    """
    name, model = adapter_component(pipe, component)
    loaded = getattr(model, "peft_config", {})
    names = list(loaded) if adapter_names is None else list(adapter_names)
    unknown = [n for n in names if n not in loaded]
    if not names or unknown:
        raise ValueError(
            f"save_adapter: {name} holds adapters {sorted(loaded)}; nothing to save under {unknown or names}. Fix: "
            "load or train an adapter first, or pass adapter_names= among those."
        )
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"save_adapter: {path} already exists. Fix: pass another path or overwrite=True.")
    with staged_directory(path) as staging:
        for adapter in names:
            folder = staging if adapter == "default" else staging / adapter
            folder.mkdir(parents=True, exist_ok=True)
            config = copy.copy(loaded[adapter])
            config.inference_mode = True  # as PeftModel.save_pretrained records it
            # the pipeline it came from (hub id or folder) names the base in the config and the model card
            config.base_model_name_or_path = config.base_model_name_or_path or _base_name(pipe, name) or None
            config.save_pretrained(str(folder))
            state = get_peft_model_state_dict(model, adapter_name=adapter)
            tensors = {PEFT_MODEL_PREFIX + key: value.detach().cpu().contiguous() for key, value in state.items()}
            save_file(tensors, str(folder / SAFETENSORS_WEIGHTS), metadata={"format": "pt"})
    return path


def _base_name(pipe: DiffusionPipeline | nn.Module, component: str) -> str:
    """``hub-id/unet`` (or ``folder/unet``) of a pipeline loaded with ``from_pretrained``; "" otherwise."""
    if isinstance(pipe, DiffusionPipeline):
        return f"{pipe.name_or_path}/{component}" if pipe.name_or_path else ""
    return str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or "")


def set_adapters(
    pipe: DiffusionPipeline | nn.Module,
    adapter_names: str | list[str],
    component: str | None = None,
    trainable: bool = False,
) -> None:
    """Make exactly ``adapter_names`` active, composing in this order (the order ``merge_adapters`` folds them).

    Their tensors are frozen unless ``trainable``; inactive adapters are always frozen (PEFT's rule).
    """
    name, model = adapter_component(pipe, component)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    loaded = getattr(model, "peft_config", {})
    unknown = [n for n in names if n not in loaded]
    if unknown or not names:
        raise ValueError(
            f"set_adapters: {name} holds adapters {sorted(loaded)}, not {unknown or names}. Fix: pass names among "
            "those (use adapters_disabled(pipe) to run without any)."
        )
    set_adapter(model, names, inference_mode=not trainable)


@contextmanager
def adapters_disabled(pipe: DiffusionPipeline | nn.Module, component: str | None = None) -> Iterator[None]:
    """Run the base model inside the ``with`` block; the adapters (and their trainable flags) come back after."""
    _, model = adapter_component(pipe, component)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in flags:  # PEFT's enable_adapters marks active adapters trainable again
            parameter.requires_grad_(flag)


def delete_adapter(pipe: DiffusionPipeline | nn.Module, adapter_name: str, component: str | None = None) -> None:
    """Remove one adapter from the component; the remaining ones stay loaded (and active if they were)."""
    name, model = adapter_component(pipe, component)
    loaded = getattr(model, "peft_config", {})
    if adapter_name not in loaded:
        raise ValueError(f"delete_adapter: {name} holds adapters {sorted(loaded)}, not {adapter_name!r}.")
    if any(adapter_name in m.merged_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)):
        raise ValueError(f"delete_adapter: {adapter_name!r} is merged into {name}. Fix: unmerge it first.")
    _discard_adapter(model, adapter_name)


def merge_adapters(
    pipe: DiffusionPipeline | nn.Module, adapter_names: list[str] | None = None, component: str | None = None
) -> DiffusionPipeline | nn.Module:
    """Fold the active adapters (or ``adapter_names``, in that order) into the weights; remove every adapter module.

    Conv2d layers merge exactly (``W R^T`` on the flattened filter). Adapters not merged are dropped
    with their modules, as with PEFT's ``merge_and_unload``. Afterwards the component is a plain
    diffusers model: ``export_pipeline`` / ``pipe.save_pretrained`` write a folder that
    ``DiffusionPipeline.from_pretrained`` loads without orthoft or PEFT. Returns ``pipe``.
    """
    name, model = adapter_component(pipe, component)
    loaded = getattr(model, "peft_config", {})
    unknown = [n for n in adapter_names or [] if n not in loaded]
    if unknown:
        raise ValueError(f"merge_adapters: {name} holds adapters {sorted(loaded)}, not {unknown}.")
    layers = [(key, m) for key, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError(f"merge_adapters: {name} holds no adapter modules. Fix: load_adapter(pipe, path) first.")
    for _, layer in layers:
        if adapter_names != []:  # [] removes the adapters without merging any
            layer.merge(adapter_names=adapter_names)
    _unwrap_layers(model, layers)
    return pipe


__all__ = [
    "DENOISER_COMPONENTS",
    "active_adapters",
    "adapter_component",
    "adapters_disabled",
    "delete_adapter",
    "list_adapters",
    "load_adapter",
    "merge_adapters",
    "save_adapter",
    "set_adapters",
]
