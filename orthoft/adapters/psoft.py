"""PSOFT: an orthogonal rotation inside the principal subspace of the frozen weight (Wu et al., ICLR 2026)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..orthogonal import packed_size, rotation_from_packed
from ..orthogonal.spectral import principal_factors
from .base import OrthoLayer, OrthoTuner, check_rank
from .config import CayleyConfig


@dataclass
class PSOFTConfig(CayleyConfig):
    """PSOFT: ``W' = W + B (diag(b) R diag(a) - I) A`` with ``W = U S V^T``, ``A = V_r^T``, ``B = U_r S_r``.

    Learning rate (``optim.lr: auto``, ``orthoft.recommended_lr``): AdamW 0.01, Muon 0.003, NorMuon 0.003,
    TurboMuon 0.003, ROOT 0.003, AuON 0.03 (all grid-measured on MiniLM-L6 / Rotten Tomatoes;
    ``docs/quality.md``). Short fine-tunes of small models; see there for larger ones.

    ``A`` has orthonormal rows and, with ``B``, stays frozen; only the ``r x r`` rotation ``R``
    (packed skew through the Cayley map) and the vectors ``a``, ``b`` (init 1) train:
    ``r(r-1)/2 + 2r`` parameters per layer. The model equals the base model at init.

    ``A`` and ``B`` are saved with the adapter (``r (in + out)`` numbers per layer, LoRA-sized), so a
    reload never depends on the SVD being reproducible.

    Args:
        r: rank of the principal subspace (``<= min(out, in)`` of every targeted layer).
        svd: ``"full"`` (``torch.linalg.svd``) or ``"lowrank"`` (randomized ``torch.svd_lowrank``,
            much faster on large weights).
        svd_niter: power iterations of the low-rank SVD.
        svd_seed: seed of the low-rank SVD's random projection (a forked RNG; the global one is untouched).
        train_scale_a: train ``a`` (input side of ``R``); otherwise ``a = 1``.
        train_scale_b: train ``b`` (output side of ``R``); otherwise ``b = 1``.
        Plus the Cayley options of :class:`CayleyConfig` and the common ones of ``OrthoConfig``.
    """

    r: int = field(default=32)
    svd: Literal["full", "lowrank"] = field(default="full")
    svd_niter: int = field(default=10)
    svd_seed: int = field(default=0)
    train_scale_a: bool = field(default=True)
    train_scale_b: bool = field(default=True)

    method = "psoft"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive(r=self.r)
        if self.svd not in ("full", "lowrank"):
            raise ValueError(f"PSOFTConfig: svd must be 'full' or 'lowrank', got {self.svd!r}.")
        if self.svd_niter < 0:
            raise ValueError(f"PSOFTConfig: svd_niter must be >= 0, got {self.svd_niter}.")


class PSOFTLayer(OrthoLayer):
    method_name = "PSOFT"
    additive = True
    adapter_layer_names = ("orthoft_psoft_skew", "orthoft_psoft_a", "orthoft_psoft_b")
    other_param_names = ("adapter_configs", "orthoft_psoft_A", "orthoft_psoft_B")
    optimizer_views = {
        "orthoft_psoft_skew": "skew_packed",
        "orthoft_psoft_a": "vector",
        "orthoft_psoft_b": "vector",
    }
    merge_roles = {"orthoft_psoft_skew": "cayley", "orthoft_psoft_a": "scale", "orthoft_psoft_b": "scale"}

    def create_adapter(self, adapter_name: str, config: PSOFTConfig) -> None:
        if not hasattr(self, "orthoft_psoft_skew"):
            self.orthoft_psoft_skew = nn.ParameterDict()
            self.orthoft_psoft_a = nn.ParameterDict()
            self.orthoft_psoft_b = nn.ParameterDict()
            # frozen factors, saved with the adapter (persistent) so that loading is exact
            self.orthoft_psoft_A = BufferDict(persistent=True)
            self.orthoft_psoft_B = BufferDict(persistent=True)
        r = config.r
        check_rank("PSOFT", self.module_name, r, self.out_features, self.in_features)
        with torch.no_grad():
            u, s, v = principal_factors(
                self.dense_base_weight(), r, config.svd, niter=config.svd_niter, seed=config.svd_seed
            )
        self.orthoft_psoft_A[adapter_name] = v.T.contiguous()  # (r, in), orthonormal rows
        self.orthoft_psoft_B[adapter_name] = (u * s).contiguous()  # (out, r)
        skew = torch.zeros(packed_size(r), device=v.device)
        if not config.init_weights:
            nn.init.normal_(skew, std=0.1)
        self.orthoft_psoft_skew[adapter_name] = nn.Parameter(skew)
        if config.train_scale_a:
            self.orthoft_psoft_a[adapter_name] = nn.Parameter(torch.ones(r, device=v.device))
        if config.train_scale_b:
            self.orthoft_psoft_b[adapter_name] = nn.Parameter(torch.ones(r, device=v.device))

    def rotation(self, adapter_name: str) -> torch.Tensor:
        """The float32 ``r x r`` rotation ``R`` (orthogonal up to the Neumann truncation)."""
        config = self.adapter_configs[adapter_name]
        return rotation_from_packed(self.orthoft_psoft_skew[adapter_name], **config.rotation_kwargs())

    def core(self, adapter_name: str) -> torch.Tensor:
        """``diag(b) R diag(a)`` (float32, ``r x r``), rebuilt only when a parameter changed (inference)."""
        tensors = [self.orthoft_psoft_skew[adapter_name]]
        tensors += [d[adapter_name] for d in (self.orthoft_psoft_a, self.orthoft_psoft_b) if adapter_name in d]
        return self.cached_for_inference(adapter_name, tensors, lambda: self._build_core(adapter_name))

    def _build_core(self, adapter_name: str) -> torch.Tensor:
        core = self.rotation(adapter_name)
        if adapter_name in self.orthoft_psoft_b:
            core = self.orthoft_psoft_b[adapter_name].float()[:, None] * core
        if adapter_name in self.orthoft_psoft_a:
            core = core * self.orthoft_psoft_a[adapter_name].float()[None, :]
        return core

    def adapter_delta_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(x)
        factor_a = self.orthoft_psoft_A[adapter_name].to(dtype)
        factor_b = self.orthoft_psoft_B[adapter_name].to(dtype)
        projected = x.to(dtype) @ factor_a.T  # (..., r) coordinates in the principal subspace
        # (core - I) on the r x r side: one product instead of a product and a subtraction per token
        shift = self.core(adapter_name) - torch.eye(factor_a.shape[0], device=factor_a.device)
        return (projected @ shift.T.to(dtype)) @ factor_b.T

    def adapter_delta_weight(self, adapter_name: str) -> torch.Tensor:
        core = self.core(adapter_name)
        core = core - torch.eye(core.shape[0], device=core.device)
        return self.orthoft_psoft_B[adapter_name].float() @ core @ self.orthoft_psoft_A[adapter_name].float()


class PSOFTModel(OrthoTuner):
    prefix = "orthoft_psoft_"
    tuner_layer_cls = PSOFTLayer
