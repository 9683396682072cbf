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

Parameters are ordered layer by layer, then by left index. Application works in place on one
padded feature-major copy of the rows (a contiguous row of values per coordinate): each layer
reads and writes its pairs as whole rows, 4 multiply-adds per pair, ``O(d)`` work per row for
the tree, ``O(d log d)`` for the butterfly. It is one autograd function that saves only the
input rows and the blocks, and replays the layers in backward (layer activations are never
kept between forward and backward, so an adapted layer holds no activation of its own). ``R``
is never formed (``givens_matrix`` builds it for tests and inspection only).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

Layout = Literal["tree", "butterfly"]
LAYOUTS = ("tree", "butterfly")


@dataclass(frozen=True)
class GivensPlan:
    """Where the pairs of a Givens product on ``features`` coordinates sit.

    ``layer_pairs[r-1]`` is the number of pair slots of layer ``r`` after padding to ``padded``
    coordinates (``padded / 2^r`` for the tree, ``padded / 2`` for the butterfly); ``valid`` lists,
    in the concatenation of all slots, those whose right index is ``< features`` (None when all are).
    ``layer_active[r-1]``: the leading slots of layer ``r`` the product must visit (the tree's valid
    pairs are a prefix of each layer, so the padding's identity pairs are skipped: for ``d = 576``,
    575 pair products instead of 1023; the butterfly visits every slot).
    """

    features: int
    padded: int
    num_layers: int
    layout: str
    layer_pairs: tuple[int, ...]
    valid: torch.Tensor | None
    num_pairs: int
    layer_active: tuple[int, ...]


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
    if layout == "tree":
        layer_active = tuple(int((right < features).sum()) for right in rights)
    else:
        layer_active = layer_pairs
    return GivensPlan(features, padded, num_layers, layout, layer_pairs, valid, int(inside.sum()), layer_active)


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
    dtype here, after any float32 work on them. The result is a transposed view of a feature-major
    buffer, which a following ``Linear`` reads as it is.
    """
    d = x.shape[-1]
    if d != plan.features:
        raise ValueError(f"apply_givens: input has {d} features, the plan was made for {plan.features}.")
    if inverse:
        blocks = invert_blocks(blocks)
    if transpose:
        blocks = blocks.mT
    slots = torch.cat(_full_layer_blocks(blocks, plan)).to(x.dtype)
    reverse = transpose != inverse
    return _GivensProduct.apply(x, slots, plan.layout, plan.layer_pairs, plan.layer_active, plan.padded, reverse)


def _pairs(y: torch.Tensor, layout: str, r: int, active: int | None = None) -> torch.Tensor:
    """View of layer ``r``'s pairs in a feature-major ``(padded, M)`` buffer, left then right coordinate on dim 1.

    Tree: ``(P, 2, M)`` for pairs ``(k 2^r, k 2^r + 2^(r-1))``; butterfly: ``(padded / 2^r, 2, 2^(r-1), M)``
    for ``(i, i + 2^(r-1))``, ``i mod 2^r < 2^(r-1)``. Every coordinate is a contiguous row of ``M``
    values, and the pairs come in parameter order (by left index). ``active``: the tree's first pairs only.
    """
    half = 2 ** (r - 1)
    grouped = y.unflatten(0, (-1, 2, half))
    return grouped[:active, :, 0, :] if layout == "tree" else grouped


def _mix_(pairs: torch.Tensor, blocks: torch.Tensor) -> None:
    """``[l; r] <- B [l; r]`` for every pair, in place (``blocks`` ``(P, 2, 2)`` in parameter order).

    A tree's ``pairs`` may be its active prefix: only the first ``len(pairs)`` blocks are used.
    """
    if pairs.dim() == 3:  # tree: one batched (2, 2) x (2, M) product
        pairs.copy_(torch.bmm(blocks[: pairs.shape[0]], pairs))
        return
    left, right = pairs[:, 0], pairs[:, 1]
    b00, b01, b10, b11 = (blocks[:, i, j].reshape(*left.shape[:-1], 1) for i in (0, 1) for j in (0, 1))
    new_left = torch.addcmul(left * b00, right, b01)
    right.copy_(torch.addcmul(left * b10, right, b11))
    left.copy_(new_left)


def _block_grad(grad_pairs: torch.Tensor, input_pairs: torch.Tensor) -> torch.Tensor:
    """``sum_M g_i v_j`` for every pair: the ``(P, 2, 2)`` gradient of its block."""
    if grad_pairs.dim() == 3:
        return torch.bmm(grad_pairs, input_pairs.mT)
    return torch.einsum("aihm,ajhm->ahij", grad_pairs, input_pairs).reshape(-1, 2, 2)


def _layer_order(layer_pairs: tuple[int, ...], reverse: bool) -> list[int]:
    layers = list(range(1, len(layer_pairs) + 1))
    return layers[::-1] if reverse else layers


class _GivensProduct(torch.autograd.Function):
    """The layers of a Givens product, in place on one padded feature-major buffer; saves only ``x`` and the blocks.

    Feature-major (``(padded, M)``, one contiguous row of ``M`` values per coordinate): every pair
    operand is a whole row, so a tree layer is one batched ``(2, 2) x (2, M)`` product and a
    butterfly layer 4 vectorized multiply-adds. Backward replays the forward once to recover each
    layer's input pairs (``2 d`` numbers per row for the tree, ``d`` per layer for the butterfly,
    freed when backward ends), then walks the layers back.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        slots: torch.Tensor,
        layout: str,
        layer_pairs: tuple[int, ...],
        layer_active: tuple[int, ...],
        padded: int,
        reverse: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, slots)
        ctx.setup = (layout, layer_pairs, layer_active, padded, reverse)
        # in x's dtype even under autocast: backward runs outside the autocast region and must match
        with torch.autocast(x.device.type, enabled=False):
            y, _ = _givens_layers(x, slots, ctx.setup, keep_inputs=False)
        return y[: x.shape[-1]].T.reshape(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, slots = ctx.saved_tensors
        layout, layer_pairs, layer_active, padded, reverse = ctx.setup
        _, inputs = _givens_layers(x, slots, ctx.setup, keep_inputs=ctx.needs_input_grad[1])
        g = _padded_feature_major(grad, padded)
        per_layer = slots.split(layer_pairs)
        grad_layers: list[torch.Tensor] = [slots.new_zeros(0)] * len(layer_pairs)
        for r in reversed(_layer_order(layer_pairs, reverse)):
            g_pairs = _pairs(g, layout, r, layer_active[r - 1])
            if ctx.needs_input_grad[1]:
                block_grad = _block_grad(g_pairs, inputs.pop())
                skipped = layer_pairs[r - 1] - block_grad.shape[0]  # identity slots of the padding: no gradient
                grad_layers[r - 1] = (
                    torch.cat([block_grad, block_grad.new_zeros(skipped, 2, 2)]) if skipped else block_grad
                )
            _mix_(g_pairs, per_layer[r - 1].mT)
        grad_slots = torch.cat(grad_layers) if ctx.needs_input_grad[1] else None
        # row-major like x: a transposed gradient would make every consumer upstream stride across rows
        grad_x = g[: x.shape[-1]].T.contiguous().reshape(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_slots, None, None, None, None, None


def _padded_feature_major(x: torch.Tensor, padded: int) -> torch.Tensor:
    """``(..., d) -> (padded, M)`` contiguous, zero rows below ``d``: the buffer the layers work on in place."""
    rows = x.reshape(-1, x.shape[-1])
    y = rows.new_empty(padded, rows.shape[0])
    y[: rows.shape[1]] = rows.T
    y[rows.shape[1] :].zero_()
    return y


def _givens_layers(
    x: torch.Tensor, slots: torch.Tensor, setup: tuple, keep_inputs: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The product on a padded feature-major copy of ``x``, and (``keep_inputs``) every layer's input pairs."""
    layout, layer_pairs, layer_active, padded, reverse = setup
    y = _padded_feature_major(x, padded)
    per_layer = slots.split(layer_pairs)
    inputs = []
    for r in _layer_order(layer_pairs, reverse):
        pairs = _pairs(y, layout, r, layer_active[r - 1])
        if keep_inputs:
            inputs.append(pairs.clone())
        _mix_(pairs, per_layer[r - 1])
    return y, inputs


def givens_matrix(blocks: torch.Tensor, plan: GivensPlan) -> torch.Tensor:
    """Dense ``R`` (``features x features``), for tests and inspection only."""
    eye = torch.eye(plan.features, dtype=blocks.dtype, device=blocks.device)
    return apply_givens(eye, blocks, plan).T
