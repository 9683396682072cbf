"""Orthogonal Adaptation (Po et al., CVPR 2024): concept adapters that merge by summation.

Each concept ``c`` trains an additive low-rank update ``dW_c = B_c A_c`` on the same base
model, independently of the others. ``A_c`` (rank x in_features) is FROZEN: rows
``c*r .. (c+1)*r`` of one random orthogonal basis that every concept derives from the same
seed and the layer's name, so different concept slots give ``A_c A_c'^T = 0`` exactly. Only
``B_c`` (out_features x rank, zero at init) trains. Merging is ``W + sum_c B_c A_c``.

What orthogonality guarantees: the row spaces of the ``dW_c`` are mutually orthogonal, so on
any input inside concept ``c``'s basis span the merged update equals concept ``c``'s own update
(``subspace_interference`` is 0), and each ``B_c`` can be read back from the merged weights
(``(W_merged - W) A_c^T = B_c``). What it does not guarantee: inputs outside that span still
meet the other concepts' updates. ``layer_interference`` and ``denoiser_interference`` measure
that on each concept's own prompts.

``basis`` picks how ``A_c`` is drawn, to compare against non-orthogonal bases of the same size:
``"orthogonal"`` (disjoint slices of the shared basis), ``"independent"`` (each concept its own
random orthonormal rows: orthonormal within a concept, not across) and ``"gaussian"`` (i.i.d.
N(0, 1/in_features) entries, the paper's cheaper alternative).

Registered with PEFT as ``ORTHOFT_ORTHOGONAL_ADAPTATION`` when this module is imported
(``import orthoft.diffusion`` does it), so ``PeftModel.from_pretrained`` loads saved concepts.
The bases are saved with each adapter: a loaded concept never depends on the RNG of the
machine that loads it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..adapters.base import OrthoLayer, OrthoTuner
from ..adapters.config import OrthoConfig
from ..adapters.registry import register_method

PEFT_TYPE = "ORTHOFT_ORTHOGONAL_ADAPTATION"
BASIS_KINDS = ("orthogonal", "independent", "gaussian")


@dataclass
class OrthogonalAdaptationConfig(OrthoConfig):
    """One concept's adapter: ``dW = scale * B A`` with ``A`` a frozen slice of a shared orthogonal basis.

    Args:
        rank: rows of ``A`` (and columns of ``B``) per concept.
        concept_index: this concept's slot; concepts meant to be merged need distinct slots,
            and ``(concept_index + 1) * rank <= in_features`` of every targeted layer.
        basis: ``"orthogonal"``, ``"independent"`` or ``"gaussian"`` (see the module docstring).
        basis_seed: seed of the shared basis; concepts meant to be merged need the same seed.
        scale: multiplies ``B A`` (like LoRA's ``alpha / r``).
        Plus the common options of ``OrthoConfig``.
    """

    rank: int = field(default=4)
    concept_index: int = field(default=0)
    basis: Literal["orthogonal", "independent", "gaussian"] = field(default="orthogonal")
    basis_seed: int = field(default=0)
    scale: float = field(default=1.0)

    method_prefix = "oa"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self._check_positive(rank=self.rank)
        if self.concept_index < 0:
            raise ValueError(f"OrthogonalAdaptationConfig: concept_index must be >= 0, got {self.concept_index}.")
        if self.basis not in BASIS_KINDS:
            raise ValueError(f"OrthogonalAdaptationConfig: basis {self.basis!r} is not one of {BASIS_KINDS}.")


def _layer_seed(basis_seed: int, module_name: str, salt: int = 0) -> int:
    # crc32 is stable across processes and Python versions, unlike hash()
    return (basis_seed * 1_000_003 + zlib.crc32(module_name.encode()) * 7919 + salt) % (2**63)


def _gaussian_rows(first_row: int, count: int, in_features: int, seed: int) -> torch.Tensor:
    """Rows ``first_row .. first_row + count`` of an endless seeded Gaussian matrix (float64).

    Each row has its own generator, so a row never depends on how many rows are drawn.
    """
    rows = [
        torch.randn(
            in_features, generator=torch.Generator().manual_seed((seed + 104_729 * k) % (2**63)), dtype=torch.float64
        )
        for k in range(first_row, first_row + count)
    ]
    return torch.stack(rows)


def _orthonormal_rows(draws: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt of the rows of ``draws`` (a sign-fixed QR: row ``k`` depends only on rows ``0..k``)."""
    q, r = torch.linalg.qr(draws.T)
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * sign).T


def concept_basis(
    in_features: int, rank: int, concept_index: int, basis: str, basis_seed: int, module_name: str
) -> torch.Tensor:
    """Frozen ``A_c`` (rank, in_features), float32, for one layer.

    ``"orthogonal"`` orthonormalizes the first ``(concept_index + 1) * rank`` rows of the layer's
    seeded Gaussian matrix and keeps this concept's slice: every concept slot of a layer comes
    from the same basis without building the full ``in_features x in_features`` one.
    """
    seed = _layer_seed(basis_seed, module_name)
    if basis == "orthogonal":
        needed = (concept_index + 1) * rank
        if needed > in_features:
            raise ValueError(
                f"OrthogonalAdaptation: concept_index {concept_index} with rank {rank} needs {needed} basis rows, but "
                f"{module_name} has in_features {in_features}. Fix: lower rank (at most "
                f"{in_features // (concept_index + 1)}), use a lower concept slot, or exclude the module."
            )
        rows = _orthonormal_rows(_gaussian_rows(0, needed, in_features, seed))
        return rows[concept_index * rank :].contiguous().float()
    if rank > in_features:
        raise ValueError(
            f"OrthogonalAdaptation: rank {rank} exceeds in_features {in_features} of {module_name}. Fix: lower rank."
        )
    # non-orthogonal baselines: each concept draws its own rows, far from the shared basis's rows
    draws = _gaussian_rows(10_000 * (concept_index + 1), rank, in_features, seed)
    if basis == "independent":
        return _orthonormal_rows(draws).contiguous().float()
    if basis == "gaussian":
        return (draws / in_features**0.5).float()
    raise ValueError(f"OrthogonalAdaptation: basis {basis!r} is not one of {BASIS_KINDS}.")


class OrthogonalAdaptationLayer(OrthoLayer):
    method_name = "OrthogonalAdaptation"
    additive = True
    adapter_layer_names = ("orthoft_oa_B",)
    other_param_names = ("adapter_configs", "orthoft_oa_A")
    optimizer_views = {"orthoft_oa_B": "matrix"}

    def create_adapter(self, adapter_name: str, config: OrthogonalAdaptationConfig) -> None:
        if not hasattr(self, "orthoft_oa_B"):
            self.orthoft_oa_B = nn.ParameterDict()
            self.orthoft_oa_A = BufferDict({}, persistent=True)
        basis = concept_basis(
            self.in_features, config.rank, config.concept_index, config.basis, config.basis_seed, self.module_name
        )
        device = self._base_device()
        if device is not None and device.type != "meta":
            basis = basis.to(device)
        weight_b = torch.zeros(self.out_features, config.rank, device=basis.device)
        if not config.init_weights:
            nn.init.normal_(weight_b, std=0.1)
        self.orthoft_oa_A[adapter_name] = basis
        self.orthoft_oa_B[adapter_name] = nn.Parameter(weight_b)

    def basis(self, adapter_name: str) -> torch.Tensor:
        """Frozen ``A`` (rank, in_features) of an adapter."""
        return self.orthoft_oa_A[adapter_name]

    def adapter_delta_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        basis, weight_b = self.orthoft_oa_A[adapter_name], self.orthoft_oa_B[adapter_name]
        scale = self.adapter_configs[adapter_name].scale
        return (x.to(basis.dtype) @ basis.T @ weight_b.T) * scale

    def adapter_delta_weight(self, adapter_name: str) -> torch.Tensor:
        scale = self.adapter_configs[adapter_name].scale
        return (self.orthoft_oa_B[adapter_name].float() @ self.orthoft_oa_A[adapter_name].float()) * scale

    def delta_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to the layer's output for layer input ``x`` (any layer kind)."""
        if self.kind != "conv2d":
            return self.adapter_delta_forward(adapter_name, x)
        base = self.get_base_layer()
        delta = self.adapter_delta_weight(adapter_name).reshape(base.weight.shape).to(x.dtype)
        if base.padding_mode != "zeros":
            raise NotImplementedError(f"delta_output: padding_mode {base.padding_mode!r} of {self.module_name}")
        return F.conv2d(x, delta, None, base.stride, base.padding, base.dilation, base.groups)


class OrthogonalAdaptationModel(OrthoTuner):
    prefix = "orthoft_oa_"
    tuner_layer_cls = OrthogonalAdaptationLayer


register_method(PEFT_TYPE, OrthogonalAdaptationConfig, OrthogonalAdaptationModel)


# ---- combining concepts -------------------------------------------------------------------
def concept_layers(model: nn.Module) -> list[OrthogonalAdaptationLayer]:
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
def active_adapters(peft_model: PeftModel, names: list[str]):
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
    "BASIS_KINDS",
    "PEFT_TYPE",
    "Interference",
    "OrthogonalAdaptationConfig",
    "OrthogonalAdaptationLayer",
    "OrthogonalAdaptationModel",
    "activate",
    "active_adapters",
    "b_from_merged",
    "basis_overlap",
    "check_mergeable",
    "concept_basis",
    "concept_layers",
    "layer_interference",
    "load_concepts",
    "merge_concepts",
    "output_interference",
    "subspace_interference",
]
