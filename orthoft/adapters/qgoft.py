"""qGOFT / GOFT: log-depth products of (quasi-)Givens rotations applied input-side (Ma et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..orthogonal import (
    angles_to_blocks,
    apply_givens,
    givens_plan,
    identity_blocks,
    max_givens_layers,
    quasi_orthogonality_penalty,
)
from ..orthogonal.givens import LAYOUTS, GivensPlan
from .base import OrthoLayer, OrthoTuner
from .config import OrthoConfig


@dataclass
class QGOFTConfig(OrthoConfig):
    """qGOFT (default) or strict GOFT: effective weight ``W R``, ``R = G_L ... G_1`` (see ``orthogonal.givens``).

    Learning rate (``optim.lr: auto``, ``orthoft.recommended_lr``): AdamW 0.01, Muon 0.01, NorMuon 0.01,
    TurboMuon 0.01, ROOT 0.03, AuON 0.01 (all grid-measured on MiniLM-L6 / Rotten Tomatoes;
    ``docs/quality.md``). Short fine-tunes of small models; see there for larger ones.

    Layer ``r`` of ``R`` acts on pairs ``(i, i + 2^(r-1))`` inside blocks of ``2^r`` input features.

    Args:
        strict: GOFT: one angle per pair, block ``[[cos, -sin], [sin, cos]]``, ``R`` exactly
            orthogonal. Otherwise qGOFT: each pair is a free 2x2 block (4 numbers, starts at ``I``)
            whose column norms and relative angle may drift, kept near orthogonal by the penalty.
        reg_lambda: weight of the qGOFT penalty ``reg_lambda * sum_i <alpha_i, beta_i>^2`` over the
            columns ``alpha_i, beta_i`` of every block (paper: 1e-3 to 5e-2 on GLUE). Add
            ``orthoft.regularization_loss(model)`` to the training loss. Ignored when ``strict``.
        layout: ``"tree"`` (the paper's count: ``d - 1`` pairs per adapted module, coordinate 0
            sees every input) or ``"butterfly"`` (``d/2`` pairs in every Givens layer, ``(d/2) log2 d`` in all,
            every output sees every input).
        num_layers: Givens layers per adapted module; default (None) ``ceil(log2 in_features)``.
            A module with fewer features uses all ``ceil(log2 in_features)`` it has.
        Features that are not a power of two: pairs whose partner ``i + 2^(r-1)`` falls outside the
        features do not exist (identity), so ``R`` stays a product of disjoint 2x2 blocks.
        Plus the common options of ``OrthoConfig``.
    """

    strict: bool = field(default=False)
    reg_lambda: float = field(default=1e-3)
    layout: Literal["tree", "butterfly"] = field(default="tree")
    num_layers: int | None = field(default=None)

    method = "qgoft"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layout not in LAYOUTS:
            raise ValueError(f"QGOFTConfig: layout={self.layout!r} is not one of {LAYOUTS}.")
        if self.reg_lambda < 0:
            raise ValueError(f"QGOFTConfig: reg_lambda must be >= 0, got {self.reg_lambda}.")
        self.check_positive(num_layers=self.num_layers)


class QGOFTLayer(OrthoLayer):
    method_name = "qGOFT"
    # an adapter lives in exactly one of the two dicts: blocks (qGOFT) or angles (strict GOFT)
    adapter_layer_names = ("orthoft_qgoft_blocks", "orthoft_qgoft_angles")
    other_param_names = ("adapter_configs",)
    optimizer_views = {"orthoft_qgoft_blocks": "matrix_stack", "orthoft_qgoft_angles": "vector"}
    merge_roles = {"orthoft_qgoft_blocks": "quasi_blocks", "orthoft_qgoft_angles": "angles"}

    def create_adapter(self, adapter_name: str, config: QGOFTConfig) -> None:
        if not hasattr(self, "orthoft_qgoft_blocks"):
            self.orthoft_qgoft_blocks = nn.ParameterDict()
            self.orthoft_qgoft_angles = nn.ParameterDict()
        for container in (self.orthoft_qgoft_blocks, self.orthoft_qgoft_angles):
            if adapter_name in container:  # re-adding a name may switch strict <-> quasi
                del container[adapter_name]
        if self.in_features < 2:
            raise ValueError(
                f"qGOFT: {self.module_name} has {self.in_features} input feature(s); a Givens rotation needs 2. "
                "Fix: exclude the module."
            )
        plan = self.plan(adapter_name, config)
        if config.strict:
            angles = torch.zeros(plan.num_pairs)
            if not config.init_weights:
                nn.init.normal_(angles, std=0.1)
            self.orthoft_qgoft_angles[adapter_name] = nn.Parameter(angles)
        else:
            blocks = identity_blocks(plan.num_pairs)
            if not config.init_weights:
                blocks += torch.randn_like(blocks) * 0.1
            self.orthoft_qgoft_blocks[adapter_name] = nn.Parameter(blocks)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.orthoft_qgoft_blocks or adapter_name in self.orthoft_qgoft_angles

    def plan(self, adapter_name: str, config: QGOFTConfig | None = None) -> GivensPlan:
        """Pair layout of this module for one adapter (cached per shape and options)."""
        config = config or self.adapter_configs[adapter_name]
        layers = max_givens_layers(self.in_features)
        if config.num_layers is not None:
            layers = min(config.num_layers, layers)
        return givens_plan(self.in_features, config.layout, layers)

    def blocks(self, adapter_name: str) -> torch.Tensor:
        """Float32 2x2 blocks of every pair, ``(num_pairs, 2, 2)``, in ``orthogonal.givens`` order."""
        if adapter_name in self.orthoft_qgoft_angles:
            angles = self.orthoft_qgoft_angles[adapter_name]
            return self.cached_for_inference(adapter_name, [angles], lambda: angles_to_blocks(angles.float()))
        return self.orthoft_qgoft_blocks[adapter_name].float()

    def transform_input(
        self, adapter_name: str, x: torch.Tensor, transpose: bool = False, training: bool = False
    ) -> torch.Tensor:
        # x T with T = R^T maps each input row by R (effective weight W R); x T^T maps it by R^T
        return apply_givens(x, self.blocks(adapter_name), self.plan(adapter_name), transpose=transpose)

    def inverse_transform_input(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        # x T^{-T} = x R^{-1}: rows mapped by R^{-T}; exact for quasi blocks, which are not orthogonal
        if adapter_name in self.orthoft_qgoft_angles:
            return self.transform_input(adapter_name, x)
        return apply_givens(x, self.blocks(adapter_name), self.plan(adapter_name), transpose=True, inverse=True)

    def regularization_loss(self, adapter_name: str) -> torch.Tensor | None:
        """``reg_lambda * sum_i <alpha_i, beta_i>^2`` over the columns of the qGOFT blocks.

        None for strict GOFT (exactly orthogonal) or ``reg_lambda == 0``. 0 at the identity init.
        """
        config = self.adapter_configs[adapter_name]
        if config.strict or config.reg_lambda == 0 or adapter_name not in self.orthoft_qgoft_blocks:
            return None
        return config.reg_lambda * quasi_orthogonality_penalty(self.blocks(adapter_name))


class QGOFTModel(OrthoTuner):
    prefix = "orthoft_qgoft_"
    tuner_layer_cls = QGOFTLayer
