"""Butterfly (BOFT) permutations as index vectors, and the input-side butterfly product.

Factor ``i`` (0-based) works on chunks of ``b * 2^i`` coordinates split into ``2^(i+1)`` groups
of ``b/2``; the permutation lists the groups even-first (``0, 2, 4, ..., 1, 3, 5, ...``) so each
``b``-block after it joins half-blocks that lay ``2^(i-1)`` blocks apart. Factor 0 is the
identity. This is PEFT's ``block_butterfly_perm`` ordering, so parameters are interchangeable.

With ``P_i`` the permutation matrix of ``perm`` (``(P v)[k] = v[perm[k]]``) and
``B_i = P_i blockdiag(R_i) P_i^T``, the adapter rotation is ``M = B_{m-1} ... B_0`` and the
input map is ``x -> x M``: per factor a gather, a block rotation and a gather back, never a
dense ``d x d`` matrix.
"""

from __future__ import annotations

import torch

from .blocks import rotate_blocks

_PERM_CACHE: dict[tuple[int, int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


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


def butterfly_indices(
    features: int, block_size: int, factor: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse perm)`` for one factor on ``device``, cached."""
    key = (features, block_size, factor, torch.device(device))
    if key not in _PERM_CACHE:
        perm = butterfly_permutation(features, block_size, factor)
        _PERM_CACHE[key] = (perm.to(device), torch.argsort(perm).to(device))
    return _PERM_CACHE[key]


def apply_butterfly(x: torch.Tensor, rotations: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ M`` (``x @ M^T`` with ``transpose``) for ``rotations`` of shape ``(m, n, b, b)``.

    ``M = B_{m-1} ... B_0``: ``x @ M`` applies factor ``m-1`` first; ``x @ M^T`` applies factor 0
    first with transposed blocks.
    """
    m, _, b, _ = rotations.shape
    d = x.shape[-1]
    order = range(m) if transpose else reversed(range(m))
    for factor in order:
        if factor == 0:
            x = rotate_blocks(x, rotations[0], transpose)
            continue
        perm, inv = butterfly_indices(d, b, factor, x.device)
        # x @ P gathers with the inverse permutation, @ P^T with the permutation itself
        x = rotate_blocks(x.index_select(-1, inv), rotations[factor], transpose).index_select(-1, perm)
    return x


def butterfly_dense(rotations: torch.Tensor, features: int) -> torch.Tensor:
    """Dense ``M`` (for tests and inspection only)."""
    return apply_butterfly(torch.eye(features, dtype=rotations.dtype, device=rotations.device), rotations)
