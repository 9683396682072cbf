"""Butterfly (BOFT) permutations, and the input-side butterfly product as one autograd function.

Factor ``i`` (0-based) works on chunks of ``b * 2^i`` coordinates split into ``2^(i+1)`` groups
of ``b/2``; the permutation lists the groups even-first (``0, 2, 4, ..., 1, 3, 5, ...``) so each
``b``-block after it joins half-blocks that lay ``2^(i-1)`` blocks apart. Factor 0 is the
identity. This is PEFT's ``block_butterfly_perm`` ordering, so parameters are interchangeable.

With ``P_i`` the permutation matrix of ``perm`` (``(P v)[k] = v[perm[k]]``) and
``B_i = P_i blockdiag(R_i) P_i^T``, the adapter rotation is ``M = B_{m-1} ... B_0`` and the
input map is ``x -> x M``: per factor a block rotation between two layout changes, never a
dense ``d x d`` matrix.

Every factor's permutation stays inside chunks of ``c = b 2^(m-1)`` features, so ``M`` is
block-diagonal with dense ``c x c`` chunks. Up to 4 factors (``c <= 2 m b``) the activations meet
those chunks in one :class:`~orthoft.orthogonal.blocks.BlockRotation` (row-major, no gathers, nothing
recomputed in backward); the chunks themselves are read off the factored product run on ``c``
identity rows, which costs ``c / N`` of running it on the activations. With more factors the
factored product runs feature-major in :class:`~orthoft.orthogonal.blocks.BlockChain`: a
permutation is a gather of whole contiguous feature rows, the gather back of one factor composes
with the gather into the next (``m`` batched products, at most ``m + 1`` gathers), and backward
recomputes the ``m - 1`` intermediate products, so memory stays that of the input, like LoRA's.
"""

from __future__ import annotations

import torch

from .blocks import block_chain, rotate_blocks


def butterfly_permutation(features: int, block_size: int, factor: int) -> torch.Tensor:
    """Index vector of butterfly factor ``factor`` for ``features`` coordinates and ``block_size`` blocks."""
    chunk = block_size * 2**factor
    if features % chunk != 0:
        raise ValueError(f"butterfly factor {factor}: chunk {chunk} does not divide {features} features")
    if factor == 0:
        return torch.arange(features)
    half = block_size // 2
    groups = chunk // half
    group_order = torch.cat([torch.arange(0, groups, 2), torch.arange(1, groups, 2)])
    within_chunk = (group_order[:, None] * half + torch.arange(half)[None, :]).reshape(-1)
    chunk_starts = torch.arange(0, features, chunk)
    return (chunk_starts[:, None] + within_chunk[None, :]).reshape(-1)


_PLAN_CACHE: dict[tuple, tuple] = {}


def _chain_plan(features: int, block_size: int, order: tuple[int, ...], device: torch.device) -> tuple:
    """Gathers for :func:`~orthoft.orthogonal.blocks.block_chain`: ``(steps, final, inverses)``, cached.

    Factor ``f`` is ``gather(inv_f) -> blocks -> gather(perm_f)``; the gather back of one factor and the
    gather into the next compose into one (``pending[inv_f]``): at most ``m + 1`` gathers for ``m`` factors.
    """
    key = (features, block_size, order, torch.device(device))
    if key in _PLAN_CACHE:
        return _PLAN_CACHE[key]
    # cached tensors must not be inference tensors: a later training step at this size could not use them
    with torch.inference_mode(False):
        steps, pending = [], None
        for factor in order:
            if factor == 0:
                index = pending
            else:
                perm = butterfly_permutation(features, block_size, factor)
                inverse = torch.argsort(perm)
                index = inverse if pending is None else pending[inverse]
            steps.append(index)
            pending = None if factor == 0 else perm
        gathers = [*steps, pending]
        inverses = tuple(None if g is None else torch.argsort(g).to(device) for g in gathers)
        steps_on = tuple(None if g is None else g.to(device) for g in steps)
        _PLAN_CACHE[key] = (steps_on, None if pending is None else pending.to(device), inverses)
    return _PLAN_CACHE[key]


def butterfly_chunk_size(block_size: int, factors: int) -> int:
    """Width of the feature chunks ``M`` never mixes: ``b * 2^(m-1)`` (factor ``m-1``'s permutation span)."""
    return block_size * 2 ** (factors - 1)


def butterfly_chunks(rotations: torch.Tensor) -> torch.Tensor:
    """``M`` as its dense diagonal chunks ``(d / c, c, c)``, ``c`` = :func:`butterfly_chunk_size`.

    Every factor's permutation stays inside chunks of ``c`` features, so ``M = blockdiag(M_1, ...)``;
    the chunks are read off by running the factored product on ``[I_c I_c ... I_c]`` (``c`` rows),
    which costs ``c / N`` of running it on ``N`` activation rows. Differentiable in ``rotations``.
    """
    m, n, b, _ = rotations.shape
    features, chunk = n * b, butterfly_chunk_size(b, m)
    tiled = torch.eye(chunk, dtype=rotations.dtype, device=rotations.device).repeat(1, features // chunk)
    dense = _factored(tiled, rotations, transpose=False)
    return dense.reshape(chunk, features // chunk, chunk).transpose(0, 1)


def _factored(x: torch.Tensor, rotations: torch.Tensor, transpose: bool) -> torch.Tensor:
    m, n, b, _ = rotations.shape
    order = tuple(range(m)) if transpose else tuple(reversed(range(m)))
    steps, final, inverses = _chain_plan(n * b, b, order, x.device)
    blocks = (rotations.mT if transpose else rotations)[list(order)]
    return block_chain(x, blocks, steps, final, inverses)


def apply_butterfly(x: torch.Tensor, rotations: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ M`` (``x @ M^T`` with ``transpose``) for ``rotations`` of shape ``(m, n, b, b)``.

    ``M = B_{m-1} ... B_0``: ``x @ M`` applies factor ``m-1`` first; ``x @ M^T`` applies factor 0
    first with transposed blocks. The blocks are cast to ``x``'s dtype (never the activations).

    When ``M``'s dense chunks are at most twice as wide as the factored product's work per feature
    (``c <= 2 m b``: every ``m <= 4``), the activations meet ``M``'s ``c x c`` chunks in ONE block
    product: the same or up to 2x the arithmetic of ``m`` products of ``b x b`` blocks, but no
    feature gathers, no recomputed intermediates in backward and wider, faster batched products
    (``m = 2, b = 8``: one product of 16-blocks instead of two of 8-blocks and four gathers).
    """
    m, n, b, _ = rotations.shape
    d = x.shape[-1]
    if n * b != d or d % (b * 2 ** (m - 1)):
        raise ValueError(
            f"apply_butterfly: {m} factors of {n} blocks of size {b} do not fit {d} features "
            f"(need n * b == d and d divisible by b * 2^(m-1) = {b * 2 ** (m - 1)})."
        )
    if m > 1 and butterfly_chunk_size(b, m) <= 2 * m * b:
        return rotate_blocks(x, butterfly_chunks(rotations), transpose)
    return _factored(x, rotations, transpose)


def butterfly_dense(rotations: torch.Tensor, features: int) -> torch.Tensor:
    """Dense ``M`` (for tests and inspection only)."""
    return apply_butterfly(torch.eye(features, dtype=rotations.dtype, device=rotations.device), rotations)
