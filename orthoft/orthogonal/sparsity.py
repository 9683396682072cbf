"""Where a sparse ``n x n`` matrix may be nonzero (SVFT's patterns between singular vectors), and its product.

Every pattern gives positions ``(2, k)`` (row, col), sorted row-major. :func:`sparse_mix` applies
the matrix to feature-major coordinates ``(n, N)``: a banded or diagonal pattern as one
multiply-add of contiguous row ranges per diagonal, any other pattern as a gather and a scatter of
rows. It is one autograd function that saves only its input and the values, so the ``k x N``
gathered products never outlive the call (a plain gather-multiply keeps them for backward: 5x the
activations for a bandwidth-2 band).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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


@dataclass(frozen=True)
class SparsePlan:
    """How :func:`sparse_mix` applies one pattern.

    ``order`` sorts the entries by diagonal then row; ``diagonals`` lists, per diagonal, ``(offset,
    first_row, last_row + 1, start, stop)``: entries ``order[start:stop]`` sit at ``(i, i + offset)``
    for the contiguous rows ``first_row <= i < last_row + 1``. None when some diagonal has gaps (or
    there are more than ``max_diagonals``): then ``rows``/``cols`` drive a gather and a scatter.
    """

    size: int
    rows: torch.Tensor
    cols: torch.Tensor
    order: torch.Tensor | None
    diagonals: tuple[tuple[int, int, int, int, int], ...] | None


def sparse_plan(index: torch.Tensor, size: int, max_diagonals: int = 64) -> SparsePlan:
    """The :class:`SparsePlan` of positions ``index`` ``(2, k)`` in an ``size x size`` matrix."""
    rows, cols = index[0], index[1]
    offsets = (cols - rows).cpu()
    row_cpu = rows.cpu()
    order = torch.argsort(offsets * (size + 1) + row_cpu)
    distinct, counts = torch.unique_consecutive(offsets[order], return_counts=True)
    diagonals: list[tuple[int, int, int, int, int]] | None = []
    start = 0
    for offset, count in zip(distinct.tolist(), counts.tolist()):
        on_diagonal = row_cpu[order[start : start + count]]
        first, last = int(on_diagonal[0]), int(on_diagonal[-1])
        if last - first + 1 != count or len(distinct) > max_diagonals:
            diagonals = None
            break
        diagonals.append((offset, first, last + 1, start, start + count))
        start += count
    return SparsePlan(
        size,
        rows,
        cols,
        order.to(index.device) if diagonals is not None else None,
        tuple(diagonals) if diagonals is not None else None,
    )


def _mix(coords: torch.Tensor, values: torch.Tensor, plan: SparsePlan, transpose: bool) -> torch.Tensor:
    """``M z`` (``M^T z`` with ``transpose``) for every column ``z`` of ``coords`` ``(size, N)``."""
    if plan.diagonals is None:
        source, target = (plan.rows, plan.cols) if transpose else (plan.cols, plan.rows)
        gathered = coords.index_select(0, source) * values[:, None]
        return torch.zeros_like(coords).index_add_(0, target, gathered)
    out = torch.zeros_like(coords)
    sorted_values = values.index_select(0, plan.order)[:, None]
    for offset, first, stop, start, end in plan.diagonals:
        rows_at, cols_at = slice(first, stop), slice(first + offset, stop + offset)
        target, source = (cols_at, rows_at) if transpose else (rows_at, cols_at)
        out[target].addcmul_(coords[source], sorted_values[start:end])
    return out


def _values_grad(grad: torch.Tensor, coords: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
    """``sum_N grad[row] coords[col]`` for every entry: the gradient of ``M z`` w.r.t. ``M``'s values."""
    if plan.diagonals is None:
        pairs = grad.index_select(0, plan.rows).unsqueeze(1) @ coords.index_select(0, plan.cols).unsqueeze(2)
        return pairs.flatten()
    sorted_grad = grad.new_empty(plan.order.shape[0])
    for offset, first, stop, start, end in plan.diagonals:
        g, z = grad[first:stop], coords[first + offset : stop + offset]
        sorted_grad[start:end] = (g.unsqueeze(1) @ z.unsqueeze(2)).flatten()
    return torch.empty_like(sorted_grad).index_copy_(0, plan.order, sorted_grad)


class _SparseMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, coords: torch.Tensor, values: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
        ctx.save_for_backward(coords, values)
        ctx.plan = plan
        with torch.autocast(coords.device.type, enabled=False):
            return _mix(coords, values, plan, transpose=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        coords, values = ctx.saved_tensors
        grad_coords = _mix(grad, values, ctx.plan, transpose=True) if ctx.needs_input_grad[0] else None
        grad_values = _values_grad(grad, coords, ctx.plan) if ctx.needs_input_grad[1] else None
        return grad_coords, grad_values, None


def sparse_mix(coords: torch.Tensor, values: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
    """``M z`` for every column ``z`` of ``coords`` ``(size, N)``, with ``M``'s nonzeros ``values`` at ``plan``.

    ``values`` are cast to ``coords``' dtype (the activations keep theirs).
    """
    return _SparseMix.apply(coords, values.to(coords.dtype), plan)


__all__ = [
    "SparsePlan",
    "SparsityPattern",
    "banded_count",
    "banded_indices",
    "sparse_mix",
    "sparse_plan",
    "sparsity_indices",
]
