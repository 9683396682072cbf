"""SVFT: a sparse trainable matrix between the frozen singular vectors of W (Lingam et al., NeurIPS 2024)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..orthogonal.sparsity import SparsePlan, SparsityPattern, sparse_mix, sparse_plan, sparsity_indices
from ..orthogonal.spectral import canonical_signs, principal_factors
from .base import OrthoLayer, OrthoTuner, check_rank
from .config import OrthoConfig


@dataclass
class SVFTConfig(OrthoConfig):
    """SVFT: ``W' = U (S + M) V^T`` with ``W = U S V^T`` frozen and ``M`` a sparse ``n x n`` matrix.

    Learning rate (``optim.lr: auto``, ``orthoft.recommended_lr``): AdamW 0.03 for every optimizer (its tensors
    are vectors, which orthogonalized optimizers send to AdamW); grid-measured (``docs/quality.md``). Short
    fine-tunes of small models; see there for larger ones.

    Only the nonzeros of ``M`` train; they start at 0, so the model equals the base model at init
    (the reference code starts ``M`` random). The update ``U M V^T`` is added to the untouched
    base weight, so with a truncated basis (``rank``) the residual ``W - U_r S_r V_r^T`` stays
    exactly in place (the reference code drops it).

    Cost: the full basis (``n = min(out, in)``) adds two dense products (``x V`` and ``z U^T``) per
    layer, about 3x the base layer's forward FLOPs; ``rank`` makes it two ``d x r`` products. Measured
    (``docs/performance.md``): full bases 2.6-2.8x LoRA's step per layer and 2.2x QLoRA's end to end;
    ``rank=128, svd="lowrank"`` 1.07-1.31x LoRA, at about one point of accuracy on the quality benchmark.
    Prefer a truncated basis unless that point matters more than a 2x slower step.

    Args:
        pattern: where ``M`` may be nonzero. ``"plain"``: the diagonal (``n`` params);
            ``"banded"``: ``|i - j| <= bandwidth``; ``"random"``: ``num_entries`` entries drawn with
            ``seed``; ``"top_k"``: the ``num_entries`` pairs with the largest ``|u_i . v_j|``
            (needs a square weight).
        bandwidth: off-diagonals on each side for ``"banded"``.
        num_entries: entries of ``M`` for ``"random"``/``"top_k"``; default: as many as ``"banded"``
            with ``bandwidth`` (the paper's SVFT^R_d convention).
        rank: keep only the top-``rank`` singular vectors (``None``: the full basis).
        svd / svd_niter / seed: SVD backend (``"full"`` or seeded ``"lowrank"``, the latter needs
            ``rank``); ``seed`` also drives ``"random"``.
        store_basis: save ``U``, ``V`` with the adapter (exact reload whatever the SVD does) or
            recompute them from the frozen base weight on load (signs made canonical; exact on the
            same software and device). ``None``: store a truncated basis, recompute a full one
            (storing it would make the checkpoint twice the size of the adapted weights).
        Plus the common options of ``OrthoConfig``.
    """

    pattern: SparsityPattern = field(default="banded")
    bandwidth: int = field(default=2)
    num_entries: int | None = field(default=None)
    rank: int | None = field(default=None)
    svd: Literal["full", "lowrank"] = field(default="full")
    svd_niter: int = field(default=10)
    seed: int = field(default=0)
    store_basis: bool | None = field(default=None)

    method = "svft"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern not in ("plain", "banded", "random", "top_k"):
            raise ValueError(
                f"SVFTConfig: pattern {self.pattern!r} is unknown. Fix: use 'plain', 'banded', 'random' or 'top_k'."
            )
        if self.bandwidth < 0:
            raise ValueError(f"SVFTConfig: bandwidth must be >= 0, got {self.bandwidth}.")
        self.check_positive(num_entries=self.num_entries, rank=self.rank)
        if self.svd not in ("full", "lowrank"):
            raise ValueError(f"SVFTConfig: svd must be 'full' or 'lowrank', got {self.svd!r}.")
        if self.svd == "lowrank" and self.rank is None:
            raise ValueError("SVFTConfig: svd='lowrank' needs a truncated basis. Fix: set rank=... or svd='full'.")

    def stores_basis(self) -> bool:
        return self.store_basis if self.store_basis is not None else self.rank is not None


class SVFTLayer(OrthoLayer):
    method_name = "SVFT"
    additive = True
    adapter_layer_names = ("orthoft_svft_values",)
    other_param_names = ("adapter_configs", "orthoft_svft_U", "orthoft_svft_V", "orthoft_svft_index")
    optimizer_views = {"orthoft_svft_values": "vector"}
    merge_roles = {"orthoft_svft_values": "shift"}  # dW = U M V^T is linear in M

    def create_adapter(self, adapter_name: str, config: SVFTConfig) -> None:
        if not hasattr(self, "orthoft_svft_values"):
            self.orthoft_svft_values = nn.ParameterDict()
            # persistence is chosen per adapter (register_buffer below), see SVFTConfig.store_basis
            self.orthoft_svft_U = BufferDict()
            self.orthoft_svft_V = BufferDict()
            self.orthoft_svft_index = BufferDict(persistent=True)
        if config.pattern == "top_k" and self.out_features != self.in_features:
            raise ValueError(
                f"SVFT: pattern 'top_k' ranks pairs by |u_i . v_j|, which needs a square weight; "
                f"{self.module_name} is {self.out_features} x {self.in_features}. "
                "Fix: use pattern 'banded' or 'random', or exclude non-square modules."
            )
        n = min(self.out_features, self.in_features)
        rank = n if config.rank is None else config.rank
        check_rank("SVFT", self.module_name, rank, self.out_features, self.in_features)
        with torch.no_grad():
            u, _, v = principal_factors(
                self.dense_base_weight(), rank, config.svd, niter=config.svd_niter, seed=config.seed
            )
            u, v = canonical_signs(u, v)
            # a per-module seed so that "random" layers do not all share one pattern
            seed = config.seed + zlib.crc32(self.module_name.encode())
            index = sparsity_indices(config.pattern, rank, config.bandwidth, config.num_entries, seed, u, v)
        persistent = config.stores_basis()
        self.orthoft_svft_U.register_buffer(adapter_name, u, persistent=persistent)  # (out, r)
        self.orthoft_svft_V.register_buffer(adapter_name, v, persistent=persistent)  # (in, r)
        self.orthoft_svft_index[adapter_name] = index.to(u.device)
        values = torch.zeros(index.shape[1], device=u.device)
        if not config.init_weights:
            nn.init.normal_(values, std=0.1)
        self.orthoft_svft_values[adapter_name] = nn.Parameter(values)

    def sparse_apply(self, adapter_name: str, coords: torch.Tensor) -> torch.Tensor:
        """``M z`` for each column ``z`` of ``coords`` (r, N), from M's nonzeros only.

        Features on the first dim keep every gathered or accumulated row contiguous; a banded or
        diagonal ``M`` is one multiply-add of row ranges per diagonal (see ``orthogonal.sparsity``).
        """
        return sparse_mix(coords, self.orthoft_svft_values[adapter_name], self.sparse_plan(adapter_name))

    def sparse_plan(self, adapter_name: str) -> SparsePlan:
        """How ``M``'s pattern is applied, derived once from the index buffer (rebuilt if it is replaced)."""
        index = self.orthoft_svft_index[adapter_name]
        plans = self.__dict__.setdefault("_svft_plans", {})
        stamp = (index.data_ptr(), index._version, index.device, index.shape)
        if adapter_name not in plans or plans[adapter_name][0] != stamp:
            plans[adapter_name] = (stamp, sparse_plan(index, self.orthoft_svft_U[adapter_name].shape[1]))
        return plans[adapter_name][1]

    def adapter_delta_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(x)
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        coords = self.orthoft_svft_V[adapter_name].to(dtype).T @ rows.T  # (r, N) = (x V_r)^T
        mixed = self.sparse_apply(adapter_name, coords)
        out = mixed.T @ self.orthoft_svft_U[adapter_name].to(dtype).T  # (N, out)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def dense_m(self, adapter_name: str) -> torch.Tensor:
        """``M`` as a dense float32 ``r x r`` matrix (merging and inspection only)."""
        rank = self.orthoft_svft_U[adapter_name].shape[1]
        values = self.orthoft_svft_values[adapter_name].float()
        rows, cols = self.orthoft_svft_index[adapter_name]
        return values.new_zeros(rank, rank).index_put((rows, cols), values, accumulate=True)

    def adapter_delta_weight(self, adapter_name: str) -> torch.Tensor:
        u = self.orthoft_svft_U[adapter_name].float()
        v = self.orthoft_svft_V[adapter_name].float()
        return (u @ self.dense_m(adapter_name)) @ v.T


class SVFTModel(OrthoTuner):
    prefix = "orthoft_svft_"
    tuner_layer_cls = SVFTLayer
