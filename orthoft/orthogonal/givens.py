"""Log-depth products of Givens rotations (GOFT) and of free 2x2 blocks (qGOFT), applied to rows.

Layer ``r`` (1-based) acts on pairs ``(i, i + 2^(r-1))`` inside blocks of ``2^r`` coordinates
(FFT-style strides). Each pair carries a 2x2 block ``B`` acting on the column ``[x_i; x_j]``:
``[x_i; x_j] -> B [x_i; x_j]``, every other coordinate unchanged. With ``G_r`` the dense layer
matrix, the adapter's map is ``R = G_L ... G_1`` (layer 1 acts first on a column vector).

Two layouts choose which pairs of a layer exist:

* ``"tree"`` (GOFT/qGOFT as in the paper): layer ``r`` holds only the pairs whose left index is
  a multiple of ``2^r``, i.e. ``(k 2^r, k 2^r + 2^(r-1))``: ``d/2, d/4, ..., 1`` pairs, ``d - 1``
  in all. That is the paper's count (DeBERTaV3-base, 4 numbers per pair: 0.33M). Coordinate 0
  ends up depending on every input and ``d - 1`` angles move ``e_0`` to any unit vector (the
  sphere has ``d - 1`` dimensions), which is the paper's equivalence claim; ``SO(d)`` itself has
  ``d(d-1)/2`` dimensions and no ``O(d)`` parametrization reaches all of it.
* ``"butterfly"``: every ``i`` with ``i mod 2^r < 2^(r-1)``: ``d/2`` pairs per layer,
  ``(d/2) log2 d`` in all; every output then depends on every input.

Dimensions that are not a power of two: coordinates are zero-padded to ``D``, the next multiple
of ``2^L`` (``L`` layers), and a pair whose right index ``i + 2^(r-1)`` is ``>= d`` does not
exist: it has no parameter and acts as the identity. Each layer is then still a product of
disjoint 2x2 blocks on real coordinates (orthogonal when the blocks are), and padding never
leaks into the result. With the tree layout this rule keeps exactly ``d - 1`` pairs for any
``d`` (each pair merges two subtrees), e.g. 767 for ``d = 768``.

Parameters are ordered layer by layer, then by left index. Application is views, 4 multiply-adds
per pair and a stack: ``O(d)`` work per row for the tree, ``O(d log d)`` for the butterfly;
``R`` is never formed (``givens_matrix`` builds it for tests and inspection only).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

Layout = Literal["tree", "butterfly"]
LAYOUTS = ("tree", "butterfly")


@dataclass(frozen=True)
class GivensPlan:
    """Where the pairs of a Givens product on ``features`` coordinates sit.

    ``layer_pairs[r-1]`` is the number of pair slots of layer ``r`` after padding to ``padded``
    coordinates (``padded / 2^r`` for the tree, ``padded / 2`` for the butterfly); ``valid`` lists,
    in the concatenation of all slots, those whose right index is ``< features`` (None when all are).
    """

    features: int
    padded: int
    num_layers: int
    layout: str
    layer_pairs: tuple[int, ...]
    valid: torch.Tensor | None
    num_pairs: int


def max_givens_layers(features: int) -> int:
    """``ceil(log2 features)``: the layers after which every coordinate is connected."""
    return max(0, math.ceil(math.log2(features))) if features > 0 else 0


@functools.lru_cache(maxsize=256)
def givens_plan(features: int, layout: Layout = "tree", num_layers: int | None = None) -> GivensPlan:
    """The pair layout for ``features`` coordinates; ``num_layers`` defaults to ``ceil(log2 features)``."""
    if layout not in LAYOUTS:
        raise ValueError(f"givens_plan: layout {layout!r} is not one of {LAYOUTS}. Fix: pick one of them.")
    if features < 2:
        raise ValueError(f"givens_plan: {features} feature(s) have no pair to rotate. Fix: need at least 2.")
    full = max_givens_layers(features)
    num_layers = full if num_layers is None else num_layers
    if not 1 <= num_layers <= full:
        raise ValueError(
            f"givens_plan: num_layers {num_layers} is outside 1..{full} for {features} features "
            f"(layers past ceil(log2 d) = {full} would hold no pair). Fix: use 1..{full} or None."
        )
    span = 2**num_layers
    padded = -(-features // span) * span
    lefts, rights = _all_pairs(padded, layout, num_layers)
    layer_pairs = tuple(len(left) for left in lefts)
    inside = torch.cat(rights) < features
    valid = None if bool(inside.all()) else torch.nonzero(inside).flatten()
    return GivensPlan(features, padded, num_layers, layout, layer_pairs, valid, int(inside.sum()))


def _all_pairs(padded: int, layout: str, num_layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    lefts, rights = [], []
    for r in range(1, num_layers + 1):
        half = 2 ** (r - 1)
        starts = torch.arange(0, padded, 2 * half)
        if layout == "tree":
            left = starts
        else:
            left = (starts[:, None] + torch.arange(half)[None, :]).flatten()
        lefts.append(left)
        rights.append(left + half)
    return lefts, rights


def givens_pairs(plan: GivensPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the ``(left, right)`` indices of the existing pairs, in parameter order."""
    lefts, rights = _all_pairs(plan.padded, plan.layout, plan.num_layers)
    return [(left[right < plan.features], right[right < plan.features]) for left, right in zip(lefts, rights)]


def angles_to_blocks(angles: torch.Tensor) -> torch.Tensor:
    """Strict Givens blocks ``[[cos, -sin], [sin, cos]]`` of shape ``(..., 2, 2)`` from angles ``(...)``."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)


def identity_blocks(num_pairs: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``(num_pairs, 2, 2)`` identity blocks: the qGOFT init."""
    return torch.eye(2, dtype=dtype, device=device).expand(num_pairs, 2, 2).clone()


def invert_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Exact inverse of each 2x2 block (adjugate over determinant)."""
    a, b, c, d = blocks[..., 0, 0], blocks[..., 0, 1], blocks[..., 1, 0], blocks[..., 1, 1]
    det = a * d - b * c
    return torch.stack((torch.stack((d, -b), -1), torch.stack((-c, a), -1)), -2) / det[..., None, None]


def quasi_orthogonality_penalty(blocks: torch.Tensor) -> torch.Tensor:
    """``sum_i <alpha_i, beta_i>^2`` with ``alpha_i, beta_i`` the two columns of block ``i``.

    Zero exactly when every block has orthogonal columns (any column norms): qGOFT lets the norms
    adapt freely and only softly constrains the angle between the columns. 0-d, ``blocks``' dtype.
    """
    inner = (blocks[..., :, 0] * blocks[..., :, 1]).sum(-1)
    return inner.square().sum()


_VALID_CACHE: dict[tuple[int, str, int, torch.device], torch.Tensor] = {}


def _valid_on(plan: GivensPlan, device: torch.device) -> torch.Tensor:
    key = (plan.features, plan.layout, plan.num_layers, torch.device(device))
    if key not in _VALID_CACHE:
        _VALID_CACHE[key] = plan.valid.to(device)
    return _VALID_CACHE[key]


def _full_layer_blocks(blocks: torch.Tensor, plan: GivensPlan) -> list[torch.Tensor]:
    """The blocks of every pair slot, identity where a pair does not exist, split per layer."""
    if blocks.shape != (plan.num_pairs, 2, 2):
        raise ValueError(
            f"apply_givens: blocks of shape {tuple(blocks.shape)} do not fit the plan for {plan.features} "
            f"features ({plan.layout}, {plan.num_layers} layers), which needs ({plan.num_pairs}, 2, 2)."
        )
    if plan.valid is not None:
        full = torch.eye(2, dtype=blocks.dtype, device=blocks.device).expand(sum(plan.layer_pairs), 2, 2)
        blocks = full.index_put((_valid_on(plan, blocks.device),), blocks)
    return list(blocks.split(plan.layer_pairs))


def apply_givens(
    x: torch.Tensor, blocks: torch.Tensor, plan: GivensPlan, transpose: bool = False, inverse: bool = False
) -> torch.Tensor:
    """Map every row of ``x`` (last dim ``plan.features``) by ``A``, i.e. return ``x @ A^T``.

    ``A`` is ``R``, ``R^T`` (``transpose``), ``R^{-1}`` (``inverse``) or ``R^{-T}`` (both), with
    ``R = G_L ... G_1`` built from ``blocks`` ``(plan.num_pairs, 2, 2)``. ``R^T`` and ``R^{-1}``
    run the layers in reverse order with transposed / inverted blocks. Blocks are cast to ``x``'s
    dtype here, after any float32 work on them.
    """
    d = x.shape[-1]
    if d != plan.features:
        raise ValueError(f"apply_givens: input has {d} features, the plan was made for {plan.features}.")
    if inverse:
        blocks = invert_blocks(blocks)
    if transpose:
        blocks = blocks.mT
    layer_blocks = [b.to(x.dtype) for b in _full_layer_blocks(blocks, plan)]
    reverse = transpose != inverse
    y = torch.nn.functional.pad(x, (0, plan.padded - d)) if plan.padded != d else x
    if plan.layout == "tree":
        y = _tree(y, layer_blocks, reverse)
    else:
        y = _butterfly(y, layer_blocks, reverse)
    return y[..., :d] if plan.padded != d else y


def _mix(block: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        block[..., 0, 0] * left + block[..., 0, 1] * right,
        block[..., 1, 0] * left + block[..., 1, 1] * right,
    )


def _butterfly(y: torch.Tensor, layer_blocks: list[torch.Tensor], reverse: bool) -> torch.Tensor:
    batch, padded = y.shape[:-1], y.shape[-1]
    layers = range(len(layer_blocks), 0, -1) if reverse else range(1, len(layer_blocks) + 1)
    for r in layers:
        half = 2 ** (r - 1)
        pairs = y.reshape(*batch, padded // (2 * half), 2, half)
        block = layer_blocks[r - 1].reshape(padded // (2 * half), half, 2, 2)
        left, right = _mix(block, pairs[..., 0, :], pairs[..., 1, :])
        y = torch.stack((left, right), -2).reshape(*batch, padded)
    return y


def _tree(y: torch.Tensor, layer_blocks: list[torch.Tensor], reverse: bool) -> torch.Tensor:
    # Layer r only touches multiples of 2^(r-1): the even-indexed survivors of layer r-1. So peel
    # one interleaving level per layer (views), mix, and interleave back: O(d) work and memory.
    batch = y.shape[:-1]
    num_layers = len(layer_blocks)
    if not reverse:
        finished = []
        for r in range(1, num_layers + 1):
            pairs = y.reshape(*batch, -1, 2)
            y, right = _mix(layer_blocks[r - 1], pairs[..., 0], pairs[..., 1])
            finished.append(right)
        for right in reversed(finished):
            y = torch.stack((y, right), -1).reshape(*batch, -1)
        return y
    rights = []
    for _ in range(num_layers):
        pairs = y.reshape(*batch, -1, 2)
        y = pairs[..., 0]
        rights.append(pairs[..., 1])
    for r in range(num_layers, 0, -1):
        left, right = _mix(layer_blocks[r - 1], y, rights[r - 1])
        y = torch.stack((left, right), -1).reshape(*batch, -1)
    return y


def givens_matrix(blocks: torch.Tensor, plan: GivensPlan) -> torch.Tensor:
    """Dense ``R`` (``features x features``), for tests and inspection only."""
    eye = torch.eye(plan.features, dtype=blocks.dtype, device=blocks.device)
    return apply_givens(eye, blocks, plan).T
