"""BOFT: butterfly products of block Cayley rotations, plus an output scale (Liu et al., ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..orthogonal import apply_butterfly, drop_blocks, packed_size, rotation_from_packed
from .base import OrthoLayer, OrthoTuner, resolve_block_size
from .config import CayleyConfig


@dataclass
class BOFTConfig(CayleyConfig):
    """BOFT: effective weight ``diag(s) W M^T`` with ``M = B_m ... B_1``, each ``B_i`` a permuted block rotation.

    Learning rate (``optim.lr: auto``, ``orthoft.recommended_lr``): AdamW 0.003, Muon 0.003, NorMuon 0.003,
    TurboMuon 0.003, ROOT 0.01, AuON 0.003 (all grid-measured on MiniLM-L6 / Rotten Tomatoes;
    ``docs/quality.md``). Short fine-tunes of small models; see there for larger ones.

    Args:
        block_size: block size ``b`` (even, default 8 when ``num_blocks`` is not given).
        num_blocks: blocks per layer instead of ``block_size``.
        n_butterfly_factor: number ``m`` of butterfly factors (default 2); ``m`` factors mix
            ``b * 2^(m-1)`` coordinates. Needs ``in_features % (b * 2^(m-1)) == 0``. Runs the
            same on every device, no CUDA extension and no fallback to ``m = 1``.
        dropout: multiplicative dropout on the blocks of every factor.
        Plus the Cayley options of :class:`CayleyConfig` and the common ones of ``OrthoConfig``.
    """

    block_size: int | None = field(default=None)
    num_blocks: int | None = field(default=None)
    n_butterfly_factor: int = field(default=2)
    dropout: float = field(default=0.0)

    method = "boft"

    def __post_init__(self) -> None:
        super().__post_init__()
        # 0 is refused, not read as "unset": a recipe saying block_size: 0 must not train with 8
        self.check_positive(
            fix="set {name} to a size that divides the adapted layers' widths, or remove it for the default "
            "(block_size 8).",
            block_size=self.block_size,
            num_blocks=self.num_blocks,
        )
        if self.block_size is not None and self.num_blocks is not None:
            raise ValueError("BOFTConfig: set block_size or num_blocks, not both.")
        if self.block_size is None and self.num_blocks is None:
            self.block_size = 8
        if self.n_butterfly_factor < 1:
            raise ValueError(f"BOFTConfig: n_butterfly_factor must be >= 1, got {self.n_butterfly_factor}.")
        if self.n_butterfly_factor > 1 and self.block_size and self.block_size % 2:
            raise ValueError(
                f"BOFTConfig: block_size {self.block_size} must be even when n_butterfly_factor > 1 "
                "(butterflies exchange half blocks)."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BOFTConfig: dropout must be in [0, 1), got {self.dropout}.")


class BOFTLayer(OrthoLayer):
    method_name = "BOFT"
    adapter_layer_names = ("orthoft_boft_Q", "orthoft_boft_s")
    other_param_names = ("adapter_configs", "boft_block_size")
    optimizer_views = {"orthoft_boft_Q": "skew_packed", "orthoft_boft_s": "vector"}
    merge_roles = {"orthoft_boft_Q": "butterfly", "orthoft_boft_s": "scale"}

    def create_adapter(self, adapter_name: str, config: BOFTConfig) -> None:
        if not hasattr(self, "orthoft_boft_Q"):
            self.orthoft_boft_Q = nn.ParameterDict()
            self.orthoft_boft_s = nn.ParameterDict()
            self.boft_block_size: dict[str, int] = {}
        m = config.n_butterfly_factor
        b = resolve_block_size(
            "BOFT", self.module_name, self.in_features, config.block_size, config.num_blocks, 2 ** (m - 1)
        )
        if m > 1 and b % 2:
            raise ValueError(
                f"BOFT: block size {b} of {self.module_name} is odd; butterflies need an even block size. "
                "Fix: choose num_blocks so that in_features / num_blocks is even."
            )
        q = torch.zeros(m, self.in_features // b, packed_size(b))
        s = torch.ones(self.out_features)
        if not config.init_weights:
            nn.init.normal_(q, std=0.1)
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.orthoft_boft_Q[adapter_name] = nn.Parameter(q)
        self.orthoft_boft_s[adapter_name] = nn.Parameter(s)
        self.boft_block_size[adapter_name] = b

    def rotations(self, adapter_name: str, training: bool = False) -> torch.Tensor:
        """Float32 blocks of every factor, ``(m, n_blocks, b, b)``."""
        config = self.adapter_configs[adapter_name]
        packed = self.orthoft_boft_Q[adapter_name]
        rot = self.cached_for_inference(
            adapter_name, [packed], lambda: rotation_from_packed(packed, **config.rotation_kwargs())
        )
        return drop_blocks(rot, config.dropout, training)

    def transform_input(
        self, adapter_name: str, x: torch.Tensor, transpose: bool = False, training: bool = False
    ) -> torch.Tensor:
        return apply_butterfly(x, self.rotations(adapter_name, training), transpose)

    def inverse_transform_input(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        # a truncated Neumann rotation is only nearly orthogonal: undo it exactly with block inverses
        return apply_butterfly(x, torch.linalg.inv(self.rotations(adapter_name)).mT)

    def output_scale(self, adapter_name: str) -> torch.Tensor:
        return self.orthoft_boft_s[adapter_name]


class BOFTModel(OrthoTuner):
    prefix = "orthoft_boft_"
    tuner_layer_cls = BOFTLayer
