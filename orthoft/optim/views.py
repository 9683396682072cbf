"""How an adapter tensor looks as a stack of matrices to orthogonalize.

Adapter parameters are rarely one plain matrix: OFT stores one packed skew-symmetric vector per
block, BOFT a grid of them, HRA a ``d x r`` matrix. A view is a pair of functions:

- ``to_matrices(t) -> (B, m, n)``: the independent matrices hidden in ``t``;
- ``from_matrices(mats, like=t) -> tensor shaped like t``: the inverse, for the update.

Views (the strings adapter layers put in their ``optimizer_views`` class attribute):

- ``"skew_packed"``: the last dim packs the strict upper triangle of a ``b x b`` skew-symmetric
  matrix in ``torch.triu_indices(b, b, 1)`` row-major order (``L = b(b-1)/2``, the packing of
  ``orthoft.orthogonal.skew``, which does the unpacking and repacking); leading dims are
  independent blocks. Each block is unpacked to ``Q - Q^T`` and orthogonalized on its own (odd
  matrix polynomials keep skew matrices skew); blocks are never mixed.
- ``"matrix"``: a 2-D tensor is one matrix.
- ``"matrix_stack"``: ``(..., m, n)`` with leading dims a batch.
- ``"vector"``: not a matrix; goes to the AdamW fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..orthogonal.skew import block_size_from_packed, unpack_skew, upper_entries

VECTOR = "vector"


@dataclass(frozen=True)
class MatrixView:
    name: str
    to_matrices: Callable[[torch.Tensor], torch.Tensor]
    from_matrices: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def skew_block_size(packed_length: int) -> int:
    """``b`` with ``b(b-1)/2 == packed_length``; raises, naming the fix, if the length is not triangular."""
    try:
        return block_size_from_packed(packed_length)
    except ValueError as error:
        raise ValueError(
            f"A skew_packed tensor's last dim must be b(b-1)/2 for some block size b, got {packed_length}; "
            "declare the tensor with another view (e.g. 'matrix_stack') if it is not a packed skew block."
        ) from error


def skew_to_matrices(t: torch.Tensor) -> torch.Tensor:
    """Unpack ``(..., b(b-1)/2)`` strict-upper entries to a ``(B, b, b)`` stack of ``Q - Q^T``."""
    b = skew_block_size(t.shape[-1])
    return unpack_skew(t.reshape(-1, t.shape[-1]), b)


def skew_from_matrices(mats: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Repack the strict upper triangle of each ``b x b`` block (taken as it is) into ``like``'s shape."""
    return upper_entries(mats).reshape(like.shape)


def matrix_to_matrices(t: torch.Tensor) -> torch.Tensor:
    if t.ndim != 2:
        raise ValueError(
            f"The 'matrix' view needs a 2-D tensor, got shape {tuple(t.shape)}; "
            "use 'matrix_stack' for (..., m, n) batches."
        )
    return t.unsqueeze(0)


def matrix_from_matrices(mats: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mats.reshape(like.shape)


def stack_to_matrices(t: torch.Tensor) -> torch.Tensor:
    if t.ndim < 2:
        raise ValueError(
            f"The 'matrix_stack' view needs (..., m, n), got shape {tuple(t.shape)}; use 'vector' for 1-D tensors."
        )
    return t.reshape(-1, *t.shape[-2:])


VIEWS: dict[str, MatrixView] = {
    "skew_packed": MatrixView("skew_packed", skew_to_matrices, skew_from_matrices),
    "matrix": MatrixView("matrix", matrix_to_matrices, matrix_from_matrices),
    "matrix_stack": MatrixView("matrix_stack", stack_to_matrices, matrix_from_matrices),
}
VIEW_NAMES = (*VIEWS, VECTOR)


def get_view(name: str) -> MatrixView:
    """The matrix view called ``name``; ``"vector"`` has none (it goes to the AdamW fallback)."""
    if name not in VIEWS:
        raise ValueError(f"Unknown optimizer view {name!r}; use one of {VIEW_NAMES}.")
    return VIEWS[name]


def check_view(name: str, t: torch.Tensor, label: str = "tensor") -> None:
    """Raise early, naming ``label``, if ``t`` cannot be seen through view ``name``."""
    if name not in VIEW_NAMES:
        raise ValueError(f"{label}: unknown optimizer view {name!r}; use one of {VIEW_NAMES}.")
    if name == VECTOR:
        return
    try:
        get_view(name).to_matrices(torch.empty(t.shape, device="meta"))
    except ValueError as error:
        raise ValueError(f"{label} (shape {tuple(t.shape)}): {error}") from error
