"""OFTv2: block-diagonal Cayley(-Neumann) rotations applied input-side (Qiu et al. 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..orthogonal import drop_blocks, packed_size, rotate_blocks, rotation_from_packed
from .base import OrthoLayer, OrthoTuner, resolve_block_size
from .config import CayleyConfig


@dataclass
class OFTConfig(CayleyConfig):
    """OFTv2: effective weight ``W R^T``, ``R = blockdiag(Cayley(Q_1), ..., Cayley(Q_{d/b}))``.

    Learning rate (``optim.lr: auto``, ``orthoft.recommended_lr``): AdamW 0.003, Muon 0.01, NorMuon 0.01,
    TurboMuon 0.01, ROOT 0.01, AuON 0.01 (all grid-measured on MiniLM-L6 / Rotten Tomatoes;
    ``docs/quality.md``). Short fine-tunes of small models; see there for larger ones.

    Args:
        block_size: rotation block size ``b`` (default 32 when ``num_blocks`` is not given).
        num_blocks: number of blocks per layer instead of a block size (``b = in_features / num_blocks``).
        block_share: one ``b x b`` block shared by all blocks of a layer (``b(b-1)/2`` parameters).
        module_dropout: multiplicative dropout; in training each block is the identity with this probability.
        Plus the Cayley options of :class:`CayleyConfig` and the common ones of ``OrthoConfig``.
    """

    block_size: int | None = field(default=None)
    num_blocks: int | None = field(default=None)
    block_share: bool = field(default=False)
    module_dropout: float = field(default=0.0)

    method = "oft"

    def __post_init__(self) -> None:
        super().__post_init__()
        # 0 is refused, not read as "unset": a recipe saying block_size: 0 must not train with 32
        self.check_positive(
            fix="set {name} to a size that divides the adapted layers' widths, or remove it for the default "
            "(block_size 32).",
            block_size=self.block_size,
            num_blocks=self.num_blocks,
        )
        if self.block_size is not None and self.num_blocks is not None:
            raise ValueError("OFTConfig: set block_size or num_blocks, not both.")
        if self.block_size is None and self.num_blocks is None:
            self.block_size = 32
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"OFTConfig: module_dropout must be in [0, 1), got {self.module_dropout}.")


class OFTLayer(OrthoLayer):
    method_name = "OFT"
    adapter_layer_names = ("orthoft_oft_Q",)
    other_param_names = ("adapter_configs", "oft_block_size")
    optimizer_views = {"orthoft_oft_Q": "skew_packed"}
    merge_roles = {"orthoft_oft_Q": "cayley"}

    def create_adapter(self, adapter_name: str, config: OFTConfig) -> None:
        if not hasattr(self, "orthoft_oft_Q"):
            self.orthoft_oft_Q = nn.ParameterDict()
            self.oft_block_size: dict[str, int] = {}
        b = resolve_block_size("OFT", self.module_name, self.in_features, config.block_size, config.num_blocks)
        n_blocks = 1 if config.block_share else self.in_features // b
        q = torch.zeros(n_blocks, packed_size(b))
        if not config.init_weights:
            nn.init.normal_(q, std=0.1)
        self.orthoft_oft_Q[adapter_name] = nn.Parameter(q)
        self.oft_block_size[adapter_name] = b

    def rotation_blocks(self, adapter_name: str) -> torch.Tensor:
        return self.rotations(adapter_name)

    def rotations(self, adapter_name: str, training: bool = False) -> torch.Tensor:
        """The adapter's float32 blocks ``(n_blocks, b, b)`` (``n_blocks = 1`` when shared)."""
        config = self.adapter_configs[adapter_name]
        packed = self.orthoft_oft_Q[adapter_name]
        rot = self.cached_for_inference(
            adapter_name, [packed], lambda: rotation_from_packed(packed, **config.rotation_kwargs())
        )
        if training and config.module_dropout > 0 and rot.shape[0] == 1:
            # a shared block is dropped per position, not all at once
            b = rot.shape[-1]
            rot = rot.expand(self.in_features // b, b, b)
        return drop_blocks(rot, config.module_dropout, training)

    def transform_input(
        self, adapter_name: str, x: torch.Tensor, transpose: bool = False, training: bool = False
    ) -> torch.Tensor:
        return rotate_blocks(x, self.rotations(adapter_name, training), transpose)

    def inverse_transform_input(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        # a truncated Neumann rotation is only nearly orthogonal: undo it exactly with block inverses
        return rotate_blocks(x, torch.linalg.inv(self.rotations(adapter_name)).mT)


class OFTModel(OrthoTuner):
    prefix = "orthoft_oft_"
    tuner_layer_cls = OFTLayer
