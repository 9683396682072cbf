"""Block-diagonal rotations applied to the last dimension of activations or weights."""

from __future__ import annotations

import torch


def rotate_blocks(x: torch.Tensor, rotations: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ blockdiag(R_1..R_n)`` on the last dim (``x @ blockdiag(R)^T`` with ``transpose``).

    ``rotations`` is ``(n, b, b)``; ``n == 1`` means one block shared by all ``d / b`` blocks.
    The rotation is cast to ``x``'s dtype here, after being built in float32.
    """
    b = rotations.shape[-1]
    d = x.shape[-1]
    blocks = x.reshape(*x.shape[:-1], d // b, b)
    rot = rotations.transpose(-1, -2) if transpose else rotations
    rot = rot.to(x.dtype)
    if rot.shape[0] == 1:
        out = blocks @ rot[0]
    else:
        out = torch.einsum("...nk,nkc->...nc", blocks, rot)
    return out.reshape(x.shape)


def block_diagonal(rotations: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
    """Dense ``blockdiag`` of ``(n, b, b)`` rotations; a shared ``(1, b, b)`` block is repeated ``num_blocks`` times."""
    if rotations.shape[0] == 1 and num_blocks:
        rotations = rotations.expand(num_blocks, -1, -1)
    return torch.block_diag(*rotations.unbind(0))


def drop_blocks(rotations: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Multiplicative dropout: in training each ``(b, b)`` block is replaced by ``I`` with probability ``p``.

    Leading dims of ``rotations`` index independent blocks; dropped blocks pass no gradient.
    """
    if not training or p <= 0.0:
        return rotations
    keep = torch.rand(rotations.shape[:-2], device=rotations.device) >= p
    eye = torch.eye(rotations.shape[-1], device=rotations.device, dtype=rotations.dtype)
    return torch.where(keep[..., None, None], rotations, eye)
