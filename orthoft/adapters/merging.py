"""Merge several adapters of one orthoft method into one new adapter: ``merge_adapters`` and
``model.add_weighted_adapter`` (PEFT's call shape; PEFT's ``PeftModel`` forwards the call to its tuner).

Each layer class declares how its adapter tensors combine (``merge_roles``, see
:mod:`orthoft.adapters.combine`), so nothing here knows a method by name. Combination types:

* ``"lie"``: ``sum_i w_i X_i`` in each tensor's Lie-algebra coordinates, mapped back. Rotation
  generators: ``X_i = log Cayley(Q_i) = 2 artanh(Q_i)`` (the rotation's canonical coordinates;
  Cayley-Neumann adapters are read as the exact Cayley rotation their series approximates), back
  through ``Q = tanh(X / 2)`` (the inverse Cayley map of ``exp X``), so exact-Cayley results are
  exactly orthogonal and Cayley-Neumann results are orthogonal up to the series' usual truncation.
  Per-factor for butterflies. Strict Givens angles are averaged as angles; qGOFT's free 2x2 blocks
  through their polar form (angle plus log-stretch: orthogonal inputs give orthogonal results).
  Scales: geometric (``prod s_i^{w_i}``). Additive tensors: ``sum_i w_i p_i``. Weights are used as
  given, like PEFT's ``linear``: weights summing to 1 give a mean, weights of 1 a sum.
* ``"compose"``: the product of the adapters' maps in list order, i.e. exactly what merging them
  into the base one after the other gives (``W -> W T_1^T -> W T_1^T T_2^T``, also what the model
  computes with all of them active in that order); weight ``w`` raises a map to the power ``w``.
  Block rotations multiply per block and return to a generator through the inverse Cayley map
  (exact Cayley adapters only); HRA's reflections are concatenated (``r`` grows); additive updates add.
* ``"fisher"``: ``sum_i w_i F_i X_i / sum_i w_i F_i`` entry-wise in the same coordinates, ``F_i``
  the diagonal Fisher of adapter ``i`` (:func:`orthoft.adapters.fisher.estimate_fisher`), as in
  Matena & Raffel (a weighted mean; equal weights are the plain Fisher merge).
* ``"projection"``: adapters taken in list order, each keeping only its component orthogonal to the
  span of the earlier ones, then ``sum_k w_k (projected X_k)``: per rotation block in the Lie algebra,
  per tensor for angles, quasi blocks and scales, and in weight space (Frobenius inner products of
  the layers' ``dW``) for methods whose tensors are all additive.
* ``"linear"``: additive methods only (SVFT, PSOFT, CLOVER, Orthogonal Adaptation): task arithmetic
  ``p = p_0 + sum_i w_i (p_i - p_0)`` on additive tensors and scales; a rotation generator inside an
  additive method (PSOFT's core) is summed in the Lie algebra as for ``"lie"``.

Adapters with weight 0 are left out. A method refuses a type that is not exact for it, naming the
ones it supports. The merged adapter is an ordinary adapter of the same method (config copied from
the first adapter), so it saves, loads, merges and exports like any other.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft.config import PeftConfig
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..orthogonal import unpack_skew
from .base import OrthoLayer, OrthoTuner
from .combine import (
    GENERATOR_ROLES,
    compose_generators,
    compose_reflections,
    compose_scales,
    compose_shifts,
    fisher_for_coordinates,
    fisher_mean,
    from_coordinates,
    gram_of,
    projected_sum,
    to_coordinates,
    unit_shape,
    weighted_sum,
)

COMBINATION_TYPES = ("lie", "compose", "fisher", "projection", "linear")
Fisher = Mapping[str, Mapping[str, torch.Tensor]]


def tuner_of(model: nn.Module) -> OrthoTuner:
    """The orthoft tuner of a ``PeftModel`` (or the tuner itself); a ValueError for anything else."""
    if isinstance(model, OrthoTuner):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, OrthoTuner):
        return base
    raise ValueError(
        f"merge_adapters: {type(model).__name__} holds no orthoft adapters. Fix: pass the model returned by "
        "get_peft_model / PeftModel.from_pretrained with an orthoft config."
    )


def ortho_layers(tuner: OrthoTuner) -> dict[str, OrthoLayer]:
    """Every orthoft layer of the tuner's model by module name (names as in ``estimate_fisher``'s keys)."""
    return {name: module for name, module in tuner.model.named_modules() if isinstance(module, OrthoLayer)}


def refusal(layer: OrthoLayer, combination: str) -> str | None:
    """Why ``combination`` is not defined for this layer's method (None when it is), from its declared roles."""
    roles = set(layer.merge_roles.values())
    name, kind = layer.method_name, layer.map_kind
    if not roles:
        return f"{type(layer).__name__} declares no merge_roles"
    if "reflections" in roles and combination != "compose":
        return (
            f"{name} stores Householder reflections, which have neither a Lie-algebra mean nor an additive "
            "structure; only their product (reflections concatenated) is exact"
        )
    if combination == "linear" and kind == "input_map":
        return f"{name} rotates its inputs and rotations do not add; 'linear' is for additive methods"
    if combination == "compose":
        if kind == "reparametrized":
            return f"{name}'s transforms multiply when applied in sequence, which one set of its cores cannot hold"
        if kind == "additive" and roles != {"shift"}:
            return (
                f"{name}'s updates add up when applied in sequence, but a sum of two {name} updates is no {name} update"
            )
        if roles & {"angles", "quasi_blocks"}:
            return f"the product of two {name} Givens cascades is not one cascade of the same layout"
    return None


def supported_combinations(layer: OrthoLayer) -> list[str]:
    """The combination types this layer's method defines."""
    return [c for c in COMBINATION_TYPES if refusal(layer, c) is None]


def _check_request(
    tuner: OrthoTuner,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination: str,
    fisher: Fisher | None,
) -> tuple[list[str], list[float]]:
    """Validated (adapters, weights) with zero weights dropped."""
    if combination not in COMBINATION_TYPES:
        raise ValueError(
            f"merge_adapters: combination_type {combination!r} is unknown. Fix: use one of {list(COMBINATION_TYPES)}."
        )
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ValueError(
            f"merge_adapters: got {len(adapters)} adapters and {len(weights)} weights. Fix: one weight per adapter."
        )
    unknown = [a for a in adapters if a not in tuner.peft_config]
    if unknown or len(set(adapters)) != len(adapters):
        raise ValueError(
            f"merge_adapters: adapters {adapters} name unknown or repeated adapters {unknown}; the model holds "
            f"{sorted(tuner.peft_config)}. Fix: list each loaded adapter once."
        )
    if adapter_name in tuner.peft_config:
        raise ValueError(
            f"merge_adapters: adapter {adapter_name!r} already exists. Fix: choose a new name or delete_adapter it."
        )
    types = {tuner.peft_config[a].peft_type for a in adapters}
    if len(types) > 1:
        raise ValueError(
            f"merge_adapters: adapters {adapters} belong to different methods {sorted(map(str, types))}. Fix: merge "
            "adapters of one method (activate adapters of different methods together instead)."
        )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"merge_adapters: weights {weights} must be finite numbers.")
    if combination == "fisher":
        if any(w < 0 for w in weights):
            raise ValueError(f"merge_adapters: 'fisher' takes weights >= 0 (a weighted mean), got {weights}.")
        missing = [a for a, w in zip(adapters, weights) if w and (fisher is None or a not in fisher)]
        if missing:
            raise ValueError(
                f"merge_adapters: 'fisher' needs a Fisher estimate of {missing}. Fix: pass "
                "fisher={name: orthoft.estimate_fisher(model, name, batches)} for every adapter."
            )
    kept = [(a, w) for a, w in zip(adapters, weights) if w != 0]
    if not kept:
        raise ValueError(f"merge_adapters: every weight is 0 ({weights}). Fix: give at least one adapter a weight.")
    return [a for a, _ in kept], [w for _, w in kept]


def _frozen_state(layer: OrthoLayer, layer_name: str, present: list[str]) -> dict[str, torch.Tensor]:
    """The frozen per-adapter data every merged adapter shares (checked equal across ``present``), first's values."""
    shared: dict[str, torch.Tensor] = {}
    first = present[0]
    for container_name in layer.other_param_names:
        container = getattr(layer, container_name, None)
        if container_name == "adapter_configs" or container is None or first not in container:
            continue
        reference = container[first]
        for other in present[1:]:
            value = container[other] if other in container else None
            if isinstance(reference, torch.Tensor):
                same = (
                    isinstance(value, torch.Tensor)
                    and value.shape == reference.shape
                    and torch.allclose(
                        value.double(), reference.double(), rtol=1e-5, atol=1e-6 * float(reference.abs().max() or 1)
                    )
                )
            else:
                same = value == reference
            if not same:
                raise ValueError(
                    f"merge_adapters: the frozen {container_name} of {layer_name} differs between adapters {first!r} "
                    f"and {other!r} (built with different settings or on different base weights), so one adapter "
                    "cannot hold both. Fix: merge adapters created with the same config on the same base (keep the "
                    "others as separate adapters and activate them together)."
                )
        if isinstance(reference, torch.Tensor):
            shared[container_name] = reference.detach().clone()
    return shared


def _merge_tensor(
    layer: OrthoLayer,
    layer_name: str,
    tensor_name: str,
    present: list[str],
    weights: list[float],
    combination: str,
    fisher: Fisher | None,
    gram: torch.Tensor | None,
) -> torch.Tensor:
    role = layer.merge_roles[tensor_name]
    where = f"merge_adapters ({layer.method_name}, {layer_name}.{tensor_name})"
    values = [getattr(layer, tensor_name)[a].detach() for a in present]
    configs = [layer.adapter_configs[a] for a in present]
    max_norms = [getattr(c, "max_skew_norm", None) for c in configs]
    reference_dict = layer.merge_references.get(tensor_name)
    reference = getattr(layer, reference_dict)[present[0]].detach() if reference_dict else None
    if role != "reflections" and len({tuple(v.shape) for v in values}) > 1:
        raise ValueError(
            f"{where}: the adapters {present} have shapes {[tuple(v.shape) for v in values]}; their configs differ "
            "(block size, rank, pattern, ...). Fix: merge adapters trained with the same settings."
        )
    if combination == "compose":
        if role in GENERATOR_ROLES:
            if role == "butterfly" and values[0].shape[0] != 1:
                raise ValueError(
                    f"{where}: a product of two {values[0].shape[0]}-factor butterflies is not one butterfly of the "
                    "same layout. Fix: use combination_type='lie' (or 'fisher'/'projection')."
                )
            inexact = [a for a, c in zip(present, configs) if not getattr(c, "use_exact_cayley", False)]
            if inexact:
                raise ValueError(
                    f"{where}: adapters {inexact} use the Cayley-Neumann series, whose rotations are only nearly "
                    "orthogonal, so their product is not exactly one generator's rotation. Fix: use "
                    "combination_type='lie', or train with use_exact_cayley=True."
                )
            return compose_generators(values, weights, max_norms, where)
        if role == "scale":
            return compose_scales(values, weights, where)
        if role == "reflections":
            return compose_reflections(values, weights, where)
        return compose_shifts(values, weights, reference)
    coords = [to_coordinates(role, v, combination, reference, m, where) for v, m in zip(values, max_norms)]
    if combination == "fisher":
        key = f"{layer_name}.{tensor_name}"
        fishers = []
        for adapter, c in zip(present, coords):
            if key not in fisher[adapter]:
                raise ValueError(
                    f"{where}: the Fisher estimate of {adapter!r} has no entry {key!r}. Fix: estimate it on this "
                    f"model with orthoft.estimate_fisher(model, {adapter!r}, batches)."
                )
            fishers.append(fisher_for_coordinates(role, fisher[adapter][key], c.shape))
        merged = fisher_mean(coords, weights, fishers)
    elif combination == "projection":
        use_weight_space = gram is not None and role == "shift"
        merged = projected_sum(
            coords, weights, gram if use_weight_space else gram_of(coords, unit_shape(role, coords[0]))
        )
    else:
        merged = weighted_sum(coords, weights)
    return from_coordinates(role, merged, combination, reference, where)


def _merge_layer(
    layer: OrthoLayer,
    layer_name: str,
    adapters: list[str],
    weights: list[float],
    combination: str,
    fisher: Fisher | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(merged tensors, shared frozen buffers) of one layer; adapters the layer lacks count as the identity."""
    kept = [(a, w) for a, w in zip(adapters, weights) if layer.has_adapter(a)]
    present, present_weights = [a for a, _ in kept], [w for _, w in kept]
    for adapter in present:
        reason = layer.merge_refusal(adapter, combination)
        if reason:
            raise ValueError(
                f"merge_adapters: {reason}, so {combination!r} is not exact for it. Fix: merge adapters trained "
                "without that setting, or activate the adapters together instead of merging them."
            )
    shared = _frozen_state(layer, layer_name, present)
    gram = None
    if combination == "projection" and set(layer.merge_roles.values()) == {"shift"}:
        # a "shift" tensor moves the weight linearly: project in weight space (Frobenius products of dW)
        deltas = torch.stack([layer.get_delta_weight(a).detach().double().reshape(-1) for a in present])
        gram = deltas @ deltas.T
    merged: dict[str, torch.Tensor] = {}
    for tensor_name in layer.merge_roles:
        holders = [a for a in present if a in getattr(layer, tensor_name)]
        if not holders:
            continue
        if len(holders) != len(present):
            raise ValueError(
                f"merge_adapters: in {layer_name}, adapters {holders} store {tensor_name} and "
                f"{sorted(set(present) - set(holders))} do not (different variants of {layer.method_name}, e.g. "
                "strict and quasi qGOFT). Fix: merge adapters of the same variant."
            )
        with torch.no_grad():
            merged[tensor_name] = _merge_tensor(
                layer, layer_name, tensor_name, present, present_weights, combination, fisher, gram
            )
    return merged, shared


def _union_targets(configs: list[PeftConfig]) -> Any:
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, (set, list)) for t in targets):
        return set().union(*targets)
    if len({str(t) for t in targets}) == 1:
        return targets[0]
    return "|".join(f"({t if isinstance(t, str) else '|'.join(sorted(t))})" for t in targets)


def _merged_config(
    tuner: OrthoTuner,
    adapters: list[str],
    results: dict[str, dict[str, torch.Tensor]],
    layers: dict[str, OrthoLayer],
    modules_to_save_from: str | None,
) -> PeftConfig:
    configs = [tuner.peft_config[a] for a in adapters]
    first = copy.deepcopy(configs[0])
    changes: dict[str, Any] = {"target_modules": _union_targets(configs)}
    with_modules = [a for a, c in zip(adapters, configs) if c.modules_to_save]
    if with_modules and modules_to_save_from not in adapters:
        raise ValueError(
            f"merge_adapters: adapters {with_modules} train their own copies of {configs[0].modules_to_save} "
            "(modules_to_save, e.g. a task head); full copies cannot be averaged. Fix: pass "
            f"modules_to_save_from=<one of {adapters}> to give the merged adapter that adapter's copies."
        )
    if modules_to_save_from is not None:
        changes["modules_to_save"] = tuner.peft_config[modules_to_save_from].modules_to_save
    bound = getattr(first, "max_skew_norm", None)
    for layer_name, tensors in results.items():
        layer = layers[layer_name]
        for tensor_name, value in tensors.items():
            role = layer.merge_roles[tensor_name]
            if role == "reflections":
                if changes.get("r", value.shape[-1]) != value.shape[-1]:
                    raise ValueError(
                        f"merge_adapters: composing gives {value.shape[-1]} reflections in {layer_name} but "
                        f"{changes['r']} elsewhere (the adapters adapt different layers), and one config has one r. "
                        "Fix: compose adapters that target the same modules."
                    )
                changes["r"] = value.shape[-1]
                if value.shape[-1] % 2:
                    changes["init_weights"] = False  # an odd count cannot start at the identity; values are set below
            if role in GENERATOR_ROLES and bound is not None and value.shape[-1]:
                norm = float(torch.linalg.matrix_norm(unpack_skew(value)).max())
                if norm <= bound * (1 + 1e-6):
                    continue
                if not getattr(first, "use_exact_cayley", False):
                    raise ValueError(
                        f"merge_adapters: a merged generator of {layer_name} has norm {norm:.3f} > max_skew_norm "
                        f"{bound}; the Cayley-Neumann series would clamp it into another rotation. Fix: use smaller "
                        "weights, or merge adapters trained with use_exact_cayley=True."
                    )
                changes["max_skew_norm"] = None  # exact Cayley needs no bound: keep the merged rotation as it is
    return dataclasses.replace(first, **changes)


def _write(
    tuner: OrthoTuner,
    adapter_name: str,
    results: dict[str, dict[str, torch.Tensor]],
    shared: dict[str, dict[str, torch.Tensor]],
) -> None:
    layers = ortho_layers(tuner)
    with torch.no_grad():
        for layer_name, tensors in results.items():
            layer = layers[layer_name]
            for container_name, value in shared[layer_name].items():
                container = getattr(layer, container_name)
                if adapter_name in container and container[adapter_name].shape == value.shape:
                    container[adapter_name].copy_(value.to(container[adapter_name].dtype))
            for tensor_name, value in tensors.items():
                param = getattr(layer, tensor_name)[adapter_name]
                if param.shape != value.shape:
                    raise RuntimeError(
                        f"merge_adapters: {layer_name}.{tensor_name} of {adapter_name!r} has shape "
                        f"{tuple(param.shape)}, the merge gave {tuple(value.shape)}"
                    )
                param.copy_(value.to(device=param.device, dtype=param.dtype))
                param.requires_grad_(False)


def _copy_modules_to_save(tuner: OrthoTuner, source: str, adapter_name: str) -> None:
    for module in tuner.model.modules():
        if isinstance(module, ModulesToSaveWrapper) and source in module.modules_to_save:
            if adapter_name in module.modules_to_save:
                module.modules_to_save[adapter_name].load_state_dict(module.modules_to_save[source].state_dict())


def merge_adapters(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "lie",
    *,
    fisher: Fisher | None = None,
    modules_to_save_from: str | None = None,
) -> None:
    """Add ``adapter_name`` to ``model``: the adapters ``adapters`` combined by ``combination_type``.

    Args:
        model: a ``PeftModel`` with orthoft adapters (or its tuner, ``model.base_model``).
        adapters: names of loaded adapters of one method, in order (the order matters for
            ``"compose"`` and ``"projection"``).
        weights: one number per adapter (0 leaves it out); see the module docstring per type.
        adapter_name: the new adapter's name; it is added inactive, like PEFT's ``add_weighted_adapter``.
        combination_type: ``"lie"``, ``"compose"``, ``"fisher"``, ``"projection"`` or ``"linear"``.
        fisher: for ``"fisher"``: adapter name -> :func:`orthoft.estimate_fisher` result.
        modules_to_save_from: when the adapters train ``modules_to_save`` (e.g. a task head), the adapter
            whose copies the merged adapter takes; heads are never averaged.

    Nothing is changed when an error is raised before the new adapter is injected (every check and all
    the math run first).
    """
    tuner = tuner_of(model)
    adapters, weights = _check_request(tuner, adapters, weights, adapter_name, combination_type, fisher)
    layers = {n: layer for n, layer in ortho_layers(tuner).items() if any(layer.has_adapter(a) for a in adapters)}
    if not layers:
        raise ValueError(f"merge_adapters: no orthoft layer holds any of {adapters}.")
    for layer_name, layer in layers.items():
        reason = refusal(layer, combination_type)
        if reason:
            raise ValueError(
                f"merge_adapters: combination_type {combination_type!r} is not defined for {layer.method_name}: "
                f"{reason}. Fix: use one of {supported_combinations(layer)}."
            )
        if layer.merged_adapters:
            raise ValueError(
                f"merge_adapters: {layer_name} has adapters {layer.merged_adapters} merged into its base weight. "
                "Fix: unmerge_adapter() first; merging works from unmerged adapters."
            )
    results, shared = {}, {}
    for layer_name, layer in layers.items():
        results[layer_name], shared[layer_name] = _merge_layer(
            layer, layer_name, adapters, weights, combination_type, fisher
        )
    config = _merged_config(tuner, adapters, results, layers, modules_to_save_from)
    tuner.peft_config[adapter_name] = config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
    except BaseException:
        del tuner.peft_config[adapter_name]
        raise
    _write(tuner, adapter_name, results, shared)
    if modules_to_save_from is not None:
        _copy_modules_to_save(tuner, modules_to_save_from, adapter_name)


__all__ = ["COMBINATION_TYPES", "merge_adapters", "ortho_layers", "refusal", "supported_combinations", "tuner_of"]
