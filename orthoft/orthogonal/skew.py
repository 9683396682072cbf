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
def _upper_indices(block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # cached tensors must not be inference tensors, or later training at this size could not save them
    with torch.inference_mode(False):
        rows, cols = torch.triu_indices(block_size, block_size, 1)
    return rows, cols


def unpack_skew(packed: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """``(..., b(b-1)/2) -> (..., b, b)`` skew-symmetric ``Q`` with ``Q[i, j] = packed`` for ``i < j``."""
    b = block_size if block_size is not None else block_size_from_packed(packed.shape[-1])
    rows, cols = _upper_indices(b)
    rows, cols = rows.to(packed.device), cols.to(packed.device)
    upper = packed.new_zeros(*packed.shape[:-1], b, b)
    upper[..., rows, cols] = packed
    return upper - upper.transpose(-1, -2)


def upper_entries(matrix: torch.Tensor) -> torch.Tensor:
    """``(..., b, b) -> (..., b(b-1)/2)``: the strict upper triangle in packed order, taken as it is.

    For a matrix that is already skew-symmetric this is :func:`pack_skew` without averaging in the
    lower triangle, so values round-trip bit for bit through :func:`unpack_skew`.
    """
    b = matrix.shape[-1]
    rows, cols = _upper_indices(b)
    rows, cols = rows.to(matrix.device), cols.to(matrix.device)
    return matrix[..., rows, cols]


def pack_skew(matrix: torch.Tensor) -> torch.Tensor:
    """``(..., b, b) -> (..., b(b-1)/2)``: the strict upper triangle of the skew part of ``matrix``."""
    return upper_entries(0.5 * (matrix - matrix.transpose(-1, -2)))
