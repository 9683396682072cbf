"""Where a sparse ``n x n`` matrix may be nonzero: SVFT's patterns between singular vectors.

Every pattern gives positions ``(2, k)`` (row, col), sorted row-major.
"""

from __future__ import annotations

from typing import Literal

import torch

SparsityPattern = Literal["plain", "banded", "random", "top_k"]


def banded_indices(n: int, bandwidth: int) -> torch.Tensor:
    """``(2, k)`` (row, col) pairs with ``|row - col| <= bandwidth``, row-major."""
    rows = torch.arange(n).repeat_interleave(2 * bandwidth + 1)
    cols = rows + torch.arange(-bandwidth, bandwidth + 1).repeat(n)
    keep = (cols >= 0) & (cols < n)
    return torch.stack([rows[keep], cols[keep]])


def banded_count(n: int, bandwidth: int) -> int:
    """Number of entries of an ``n x n`` band of half-width ``bandwidth``."""
    b = min(bandwidth, n - 1)
    return n * (2 * b + 1) - b * (b + 1)


def sparsity_indices(
    pattern: SparsityPattern,
    n: int,
    bandwidth: int = 2,
    num_entries: int | None = None,
    seed: int = 0,
    u: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions ``(2, k)`` (row, col) of the trainable entries of ``M``, sorted row-major.

    ``u`` (out, n) and ``v`` (in, n) are the singular vectors; ``"top_k"`` needs them with
    ``out == in`` and picks the pairs ``(i, j)`` with the largest alignment ``|u_i . v_j|``.
    """
    if pattern == "plain":
        diagonal = torch.arange(n)
        return torch.stack([diagonal, diagonal])
    if pattern == "banded":
        return banded_indices(n, bandwidth)
    k = num_entries if num_entries is not None else banded_count(n, bandwidth)
    k = min(k, n * n)
    if pattern == "random":
        generator = torch.Generator().manual_seed(seed)
        flat = torch.randperm(n * n, generator=generator)[:k]
    elif pattern == "top_k":
        if u is None or v is None or u.shape[0] != v.shape[0]:
            raise ValueError("SVFT: pattern 'top_k' needs the singular vectors of a square weight.")
        alignment = (u.float().T @ v.float()).abs()  # (n, n): entry (i, j) is |u_i . v_j|
        flat = torch.topk(alignment.flatten().cpu(), k).indices
    else:
        raise ValueError(f"SVFT: unknown pattern {pattern!r}")
    flat = flat.sort().values
    return torch.stack([flat // n, flat % n])


__all__ = ["SparsityPattern", "banded_count", "banded_indices", "sparsity_indices"]
