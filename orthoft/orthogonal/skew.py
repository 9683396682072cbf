"""Skew-symmetric matrices stored as their strict upper triangle.

A ``b x b`` skew-symmetric matrix has ``b(b-1)/2`` free entries. Adapters store those entries
packed in ``torch.triu_indices(b, b, 1)`` order (row-major strict upper triangle), the same
order PEFT's OFT uses, so packed tensors can be exchanged with it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def packed_size(block_size: int) -> int:
    """Number of free entries of a ``block_size x block_size`` skew-symmetric matrix."""
    return block_size * (block_size - 1) // 2


def block_size_from_packed(length: int) -> int:
    """Inverse of :func:`packed_size`; raises if ``length`` is not triangular."""
    b = (1 + math.isqrt(1 + 8 * length)) // 2
    if packed_size(b) != length:
        raise ValueError(f"packed skew length {length} is not b(b-1)/2 for any block size b")
    return b


@lru_cache(maxsize=64)
def _flat_indices(block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index vectors on ``device``: packed slot -> its flat ``b*b`` position above the diagonal, the same
    below it, and flat position -> signed source slot.

    The last one reads a source ``[0, p_1..p_K, -p_1..-p_K]``: ``Q = source[index]`` is the whole
    unpacking in one gather (one op and one autograd node instead of zeros, a scatter, a transpose and a
    subtraction; the build runs once per adapted layer and step, so op count is its cost).
    """
    with torch.inference_mode(False):
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        upper, lower = rows * block_size + cols, cols * block_size + rows
        k = rows.numel()
        source = torch.zeros(block_size * block_size, dtype=torch.long)
        source[upper] = torch.arange(1, k + 1)
        source[lower] = torch.arange(k + 1, 2 * k + 1)
        return upper.to(device), lower.to(device), source.to(device)


def unpack_skew(packed: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """``(..., b(b-1)/2) -> (..., b, b)`` skew-symmetric ``Q`` with ``Q[i, j] = packed`` for ``i < j``."""
    b = block_size if block_size is not None else block_size_from_packed(packed.shape[-1])
    _, _, source = _flat_indices(b, packed.device)
    signed = torch.cat([packed.new_zeros(*packed.shape[:-1], 1), packed, -packed], dim=-1)
    return signed.index_select(-1, source).view(*packed.shape[:-1], b, b)


def upper_entries(matrix: torch.Tensor) -> torch.Tensor:
    """``(..., b, b) -> (..., b(b-1)/2)``: the strict upper triangle in packed order, taken as it is.

    For a matrix that is already skew-symmetric this is :func:`pack_skew` without averaging in the
    lower triangle, so values round-trip bit for bit through :func:`unpack_skew`.
    """
    b = matrix.shape[-1]
    upper, _, _ = _flat_indices(b, matrix.device)
    return matrix.reshape(*matrix.shape[:-2], b * b).index_select(-1, upper)


def skew_entries(matrix: torch.Tensor) -> torch.Tensor:
    """``upper_entries(M - M^T)`` without forming ``M - M^T``: two gathers of the packed size.

    The gradient of a function of packed skew entries, from the gradient ``M`` with respect to ``Q``.
    """
    b = matrix.shape[-1]
    upper, lower, _ = _flat_indices(b, matrix.device)
    flat = matrix.reshape(*matrix.shape[:-2], b * b)
    return flat.index_select(-1, upper) - flat.index_select(-1, lower)


def pack_skew(matrix: torch.Tensor) -> torch.Tensor:
    """``(..., b, b) -> (..., b(b-1)/2)``: the strict upper triangle of the skew part of ``matrix``."""
    return upper_entries(0.5 * (matrix - matrix.transpose(-1, -2)))
