"""HRA: chains of Householder reflections applied input-side in compact WY form (Yuan et al., NeurIPS 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..orthogonal import (
    apply_householder,
    apply_subspace_reflection,
    householder_wy_right,
    normalized_gram_penalty,
    orthonormal_basis,
)
from .base import OrthoLayer, OrthoTuner
from .config import OrthoConfig


@dataclass
class HRAConfig(OrthoConfig):
    """HRA: effective weight ``W H``, ``H = H_1 ... H_r``, ``H_i = I - 2 u_i u_i^T / |u_i|^2``.

    Learning rate (``optim.lr: auto``, ``orthoft.recommended_lr``): AdamW 0.01, Muon 0.01, NorMuon 0.03,
    TurboMuon 0.01, ROOT 0.03, AuON 0.01 (all grid-measured on MiniLM-L6 / Rotten Tomatoes;
    ``docs/quality.md``). Short fine-tunes of small models; see there for larger ones.

    ``u_i`` is column ``i`` of the trained ``U`` (``in_features x r``), exactly PEFT's ``hra_u``
    with the same order, so PEFT weights load as they are (without ``apply_GS``).

    Args:
        r: number of reflections (default 8). Must be even with ``init_weights=True``: the identity
            start repeats each random vector twice (``H_{2k-1} = H_{2k}`` cancel), and a product of
            an odd number of reflections has determinant -1, so it can never be the identity.
        apply_GS: strictly orthogonal vectors. PEFT's ``I - 2 Q Q^T`` with ``Q`` orthonormalizing
            all of ``U`` is a reflection of rank ``r`` and can never start at the identity, so here
            ``H = (I - 2 Q_a Q_a^T)(I - 2 Q_b Q_b^T)`` with ``Q_a`` orthonormalizing the odd columns
            ``u_1, u_3, ...`` and ``Q_b`` the even ones: ``r`` reflections along two orthonormal
            sets, the identity at the paired init, exactly orthogonal for any ``U``.
        reg_lambda: weight of the orthogonality penalty ``reg_lambda * |I - Uhat^T Uhat|_F`` over the
            column-normalized ``U`` (paper: 1e-5 to 1e-3; 1e-4 for Llama-2-7B). Add
            ``orthoft.regularization_loss(model)`` to the training loss. Not used with ``apply_GS``,
            which is the constraint itself.
        Plus the common options of ``OrthoConfig``.
    """

    r: int = field(default=8)
    apply_GS: bool = field(default=False)
    reg_lambda: float = field(default=1e-4)

    method = "hra"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive(r=self.r)
        if self.reg_lambda < 0:
            raise ValueError(f"HRAConfig: reg_lambda must be >= 0, got {self.reg_lambda}.")
        if self.r % 2 and self.init_weights:
            raise ValueError(
                f"HRAConfig: r={self.r} is odd, and a product of an odd number of reflections has determinant "
                "-1, so it cannot start at the identity (the base model). "
                f"Fix: use an even r, e.g. r={self.r + 1}."
            )


class HRALayer(OrthoLayer):
    method_name = "HRA"
    adapter_layer_names = ("orthoft_hra_U",)
    other_param_names = ("adapter_configs",)
    optimizer_views = {"orthoft_hra_U": "matrix"}
    merge_roles = {"orthoft_hra_U": "reflections"}

    def create_adapter(self, adapter_name: str, config: HRAConfig) -> None:
        if not hasattr(self, "orthoft_hra_U"):
            self.orthoft_hra_U = nn.ParameterDict()
        d, r = self.in_features, config.r
        if r > d:
            raise ValueError(
                f"HRA: r={r} reflections exceed the {d} input features of {self.module_name}. "
                f"Fix: use r <= {d} or exclude the module."
            )
        if config.init_weights:
            # PEFT's init: each kaiming vector twice in a row, so consecutive reflections cancel
            half = torch.empty(d, r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)
        else:
            u = torch.empty(d, r)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.orthoft_hra_U[adapter_name] = nn.Parameter(u)

    def transform_input(
        self, adapter_name: str, x: torch.Tensor, transpose: bool = False, training: bool = False
    ) -> torch.Tensor:
        # x T with T = H^T maps each input row by H (effective weight W H); x T^T maps it by H^T
        param = self.orthoft_hra_U[adapter_name]
        u = param.float()
        if not self.adapter_configs[adapter_name].apply_GS:
            right = self.cached_for_inference(
                f"{adapter_name}/{transpose}", [param], lambda: householder_wy_right(u, transpose)
            )
            return apply_householder(x, u, transpose=transpose, right=right)
        reflections = self.cached_for_inference(adapter_name, [param], lambda: self._gs_bases(u))
        # rows by H = (I - 2 Qa Qa^T)(I - 2 Qb Qb^T): the Qb reflection acts first, Qa first for H^T
        for q in reflections if transpose else reversed(reflections):
            x = apply_subspace_reflection(x, q)
        return x

    @staticmethod
    def _gs_bases(u: torch.Tensor) -> list[torch.Tensor]:
        """Orthonormal bases of the odd and the even columns of ``u`` (``apply_GS``)."""
        return [orthonormal_basis(part) for part in (u[:, 0::2], u[:, 1::2]) if part.shape[1]]

    def merge_refusal(self, adapter_name: str, combination_type: str) -> str | None:
        if self.adapter_configs[adapter_name].apply_GS:
            # H is built from the Gram-Schmidt bases of the odd and even columns: the columns are not
            # H's reflections, so concatenating two U's is not the product of the two maps
            return f"HRA adapter {adapter_name!r} uses apply_GS, whose columns are not its reflections"
        return None

    def regularization_loss(self, adapter_name: str) -> torch.Tensor | None:
        """``reg_lambda * |I - Uhat^T Uhat|_F``, ``Uhat`` the column-normalized ``U`` (0-d float32).

        Not 0 at the paired identity init: each repeated pair contributes two off-diagonal 1s, so
        it starts at about ``reg_lambda * sqrt(r)`` (plus the small overlaps of the random vectors)
        and pushes the pairs apart as in the paper. None with ``apply_GS`` or ``reg_lambda == 0``.
        """
        config = self.adapter_configs[adapter_name]
        if config.apply_GS or config.reg_lambda == 0:
            return None
        return config.reg_lambda * normalized_gram_penalty(self.orthoft_hra_U[adapter_name].float())


class HRAModel(OrthoTuner):
    prefix = "orthoft_hra_"
    tuner_layer_cls = HRALayer
