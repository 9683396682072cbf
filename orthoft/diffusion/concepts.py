"""Orthogonal Adaptation concepts on a denoiser: loading, merging, and how much concepts interfere.

The method itself (config, layer, PEFT registration) is ``orthoft.adapters.orthogonal_adaptation``:
each concept ``c`` trains ``dW_c = B_c A_c`` with ``A_c`` a frozen slice of one orthogonal basis.
This module combines concepts trained that way. On any input inside concept ``c``'s basis span
the merged update equals concept ``c``'s own update (``subspace_interference`` is 0 for
orthogonal slices); inputs outside that span still meet the other concepts' updates, which
``layer_interference`` and ``output_interference`` measure on each concept's own inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from ..adapters.orthogonal_adaptation import OrthogonalAdaptationLayer


# ---- combining concepts -------------------------------------------------------------------
def concept_layers(model: nn.Module) -> list[OrthogonalAdaptationLayer]:
    """Every Orthogonal Adaptation layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, OrthogonalAdaptationLayer)]


def load_concepts(unet: nn.Module, adapter_dirs: dict[str, str | Path]) -> PeftModel:
    """Load saved concept adapters into ``unet`` (in place) under the given names, all active."""
    if not adapter_dirs:
        raise ValueError("load_concepts: no adapters given. Fix: pass {name: saved_adapter_dir, ...}.")
    names = list(adapter_dirs)
    peft_model = PeftModel.from_pretrained(unet, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    activate(peft_model, names)
    return peft_model


def activate(peft_model: PeftModel, names: list[str]) -> None:
    """Make exactly ``names`` the active adapters (PeftModel.set_adapter takes a single name)."""
    peft_model.base_model.set_adapter(list(names))


@contextmanager
def active_adapters(peft_model: PeftModel, names: list[str]) -> Iterator[None]:
    """Make exactly ``names`` active inside the ``with`` block; the previous active set afterwards."""
    previous = list(peft_model.base_model.active_adapters)
    activate(peft_model, names)
    try:
        yield
    finally:
        activate(peft_model, previous)


def basis_overlap(model: nn.Module, names: list[str]) -> float:
    """Largest ``|A_c A_c'^T|`` entry over layers and concept pairs: 0 for mutually orthogonal bases."""
    worst = 0.0
    for layer in concept_layers(model):
        bases = [layer.basis(n).double() for n in names if n in layer.orthoft_oa_A]
        for i in range(len(bases)):
            for j in range(i + 1, len(bases)):
                worst = max(worst, float((bases[i] @ bases[j].T).abs().max()))
    return worst


def check_mergeable(model: nn.Module, names: list[str], tolerance: float = 1e-5) -> None:
    """Raise when concepts share basis directions (same slot, or different basis seeds)."""
    overlap = basis_overlap(model, names)
    if overlap > tolerance:
        raise ValueError(
            f"Orthogonal adaptation: concepts {names} have overlapping bases (max |A_c A_c'^T| = {overlap:.3g}). "
            "Fix: train each concept with its own concept_index and the same basis_seed and basis='orthogonal'."
        )


def merge_concepts(peft_model: PeftModel, names: list[str], require_orthogonal: bool = True) -> nn.Module:
    """``W + sum_c B_c A_c`` for ``names``, returned as the plain base model (adapters removed)."""
    if require_orthogonal:
        check_mergeable(peft_model, names)
    activate(peft_model, names)
    return peft_model.merge_and_unload(adapter_names=list(names))


# ---- interference -------------------------------------------------------------------------
@dataclass
class Interference:
    """Per concept: how much the other concepts change what this concept's adapter does.

    Each value is ``|others' contribution| / |own contribution|`` (0: no interference, 1: the
    others change this concept's outputs as much as its own adapter does).
    """

    per_concept: dict[str, float]

    @property
    def mean(self) -> float:
        return sum(self.per_concept.values()) / len(self.per_concept)


@torch.no_grad()
def subspace_interference(model: nn.Module, names: list[str]) -> Interference:
    """On inputs inside concept ``c``'s basis span: ``|sum_{c'!=c} dW_c' U_c| / |dW_c U_c|`` over all layers.

    ``U_c`` is an orthonormal basis of ``A_c``'s row space. Exactly 0 for orthogonal slices.
    """
    own = dict.fromkeys(names, 0.0)
    others = dict.fromkeys(names, 0.0)
    for layer in concept_layers(model):
        present = [n for n in names if n in layer.orthoft_oa_A]
        deltas = {n: layer.adapter_delta_weight(n).double() for n in present}
        for name in present:
            span = torch.linalg.qr(layer.basis(name).double().T)[0]  # (in, rank)
            own[name] += float((deltas[name] @ span).square().sum())
            rest = sum((deltas[o] for o in present if o != name), torch.zeros_like(deltas[name]))
            others[name] += float((rest @ span).square().sum())
    return Interference({n: (others[n] / own[n]) ** 0.5 if own[n] > 0 else float("nan") for n in names})


@torch.no_grad()
def layer_interference(peft_model: PeftModel, names: list[str], run_concept: Callable[[str], object]) -> Interference:
    """On each concept's real layer inputs: ``|sum_{c'!=c} dW_c' x| / |dW_c x|`` pooled over layers.

    ``run_concept(name)`` runs the model on concept ``name``'s inputs (e.g. its prompts and noisy
    images); the layer inputs are captured with only that concept active, so upstream changes by
    other concepts do not enter: this is the interference each layer adds on its own.
    """
    own = dict.fromkeys(names, 0.0)
    others = dict.fromkeys(names, 0.0)
    for name in names:
        handles = []

        def hook(layer: OrthogonalAdaptationLayer, inputs: tuple, _output: object, name: str = name) -> None:
            x = inputs[0]
            present = [n for n in names if n in layer.orthoft_oa_A]
            if name not in present:
                return
            mine = layer.delta_output(name, x).double()
            rest = sum((layer.delta_output(o, x).double() for o in present if o != name), torch.zeros_like(mine))
            own[name] += float(mine.square().sum())
            others[name] += float(rest.square().sum())

        for layer in concept_layers(peft_model):
            handles.append(layer.register_forward_hook(hook))
        try:
            with active_adapters(peft_model, [name]):
                run_concept(name)
        finally:
            for handle in handles:
                handle.remove()
    return Interference({n: (others[n] / own[n]) ** 0.5 if own[n] > 0 else float("nan") for n in names})


@torch.no_grad()
def output_interference(
    peft_model: PeftModel, names: list[str], run_concept: Callable[[str], torch.Tensor]
) -> tuple[Interference, Interference]:
    """End to end on each concept's inputs, with ``y_base``, ``y_c`` (only c) and ``y_all`` (all concepts):

    (``|y_all - y_c| / |y_c - y_base|``, ``|y_all - y_c| / |y_c|``): the change the merge brings
    relative to the concept's own effect, and relative to the whole output.
    """
    to_own, to_output = {}, {}
    for name in names:
        with peft_model.disable_adapter():
            base = run_concept(name).double()
        with active_adapters(peft_model, [name]):
            alone = run_concept(name).double()
        with active_adapters(peft_model, names):
            merged = run_concept(name).double()
        change = float((merged - alone).norm())
        to_own[name] = change / max(float((alone - base).norm()), 1e-30)
        to_output[name] = change / max(float(alone.norm()), 1e-30)
    return Interference(to_own), Interference(to_output)


def b_from_merged(layer_delta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``B_c`` read back from a merged update ``sum_c' B_c' A_c'`` (exact for orthonormal, mutually orthogonal A)."""
    return layer_delta @ basis.T


__all__ = [
    "Interference",
    "activate",
    "active_adapters",
    "b_from_merged",
    "basis_overlap",
    "check_mergeable",
    "concept_layers",
    "layer_interference",
    "load_concepts",
    "merge_concepts",
    "output_interference",
    "subspace_interference",
]
