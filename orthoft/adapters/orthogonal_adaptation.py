"""Orthogonal Adaptation (Po et al., CVPR 2024): concept adapters that merge by summation.

Each concept ``c`` trains an additive low-rank update ``dW_c = B_c A_c`` on the same base
model, independently of the others. ``A_c`` (rank x in_features) is FROZEN: rows
``c*r .. (c+1)*r`` of one random orthogonal basis that every concept derives from the same
seed and the layer's name, so different concept slots give ``A_c A_c'^T = 0`` exactly. Only
``B_c`` (out_features x rank, zero at init) trains. Merging is ``W + sum_c B_c A_c``.

What orthogonality guarantees: the row spaces of the ``dW_c`` are mutually orthogonal, so on
any input inside concept ``c``'s basis span the merged update equals concept ``c``'s own update,
and each ``B_c`` can be read back from the merged weights (``(W_merged - W) A_c^T = B_c``). What
it does not guarantee: inputs outside that span still meet the other concepts' updates.
``orthoft.diffusion.concepts`` loads, merges and measures that interference.

``basis`` picks how ``A_c`` is drawn, to compare against non-orthogonal bases of the same size:
``"orthogonal"`` (disjoint slices of the shared basis), ``"independent"`` (each concept its own
random orthonormal rows: orthonormal within a concept, not across) and ``"gaussian"`` (i.i.d.
N(0, 1/in_features) entries, the paper's cheaper alternative).

Registered with PEFT as ``ORTHOFT_ORTHOGONAL_ADAPTATION`` by ``orthoft.adapters`` like every other
method, so ``PeftModel.from_pretrained`` loads saved concepts. The bases are saved with each
adapter: a loaded concept never depends on the RNG of the machine that loads it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from .base import OrthoLayer, OrthoTuner
from .config import OrthoConfig

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

    method = "orthogonal_adaptation"
    method_prefix = "oa"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive(rank=self.rank)
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
    merge_roles = {"orthoft_oa_B": "shift"}  # dW = scale B A is linear in B (A frozen, shared)

    def create_adapter(self, adapter_name: str, config: OrthogonalAdaptationConfig) -> None:
        if not hasattr(self, "orthoft_oa_B"):
            self.orthoft_oa_B = nn.ParameterDict()
            self.orthoft_oa_A = BufferDict({}, persistent=True)
        basis = concept_basis(
            self.in_features, config.rank, config.concept_index, config.basis, config.basis_seed, self.module_name
        )
        device = self.base_device()
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
        return (x.to(basis.dtype) @ basis.T @ weight_b.T.to(basis.dtype)) * scale

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


__all__ = [
    "BASIS_KINDS",
    "OrthogonalAdaptationConfig",
    "OrthogonalAdaptationLayer",
    "OrthogonalAdaptationModel",
    "concept_basis",
]
