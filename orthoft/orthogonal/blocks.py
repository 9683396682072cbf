"""Block-diagonal rotations applied to the last dimension of activations or weights.

One block step (OFT, and BOFT's dense chunks) is :class:`BlockRotation`: row-major in and out.
Each block's slice of the rows, ``x[:, i b:(i+1) b]``, is a strided ``(n, N, b)`` view and one batched
``(N, b) x (b, b)`` product per block writes its result through a strided view of a row-major output,
so neither the activations nor their gradient are copied or transposed, and the following layer (a
``Linear`` or a bitsandbytes layer) and the layers before it get the row-major tensors they expect.

Several steps with feature permutations in between (BOFT's factored butterfly, used past 4 factors)
run feature-major in :class:`BlockChain`: ``x`` is read as ``x^T`` (``d x N``, a strided view) and
each block rotates ``b`` contiguous feature rows, ``y^T_blk = R^T x^T_blk``, so a permutation of the
features is a gather of whole contiguous rows; the caller gets ``y`` as a transposed view.

Both are custom autograd functions that save only their input and the small blocks: no copy of the
activations is kept for backward, so an adapted layer holds no activation of its own (its input is
shared with whatever else reads it, e.g. q/k/v). :class:`BlockChain`'s backward recomputes the
``m - 1`` intermediate products, never the last one.
"""

from __future__ import annotations

from typing import Any

import torch

Gather = torch.Tensor | None


def _feature_major(x: torch.Tensor) -> torch.Tensor:
    """``(..., d) -> (d, N)``: a view when ``x`` is row-major (or already a transposed view)."""
    return x.reshape(-1, x.shape[-1]).T


def _row_major(blocks: torch.Tensor) -> torch.Tensor:
    # a transposed (b, b) operand sends the batched product down a slower kernel (~1.4x at b=32, N=512
    # on CPU); copying the small blocks costs nothing next to that
    return blocks.contiguous()


def _chain_forward(xt: torch.Tensor, steps: tuple[Gather, ...], blocks: torch.Tensor) -> torch.Tensor:
    """``(d, N)`` through every gather + block step: the last product."""
    m, n, b, _ = blocks.shape
    cur, blocks_t = xt, _row_major(blocks.mT)
    for j in range(m):
        gathered = cur if steps[j] is None else cur.index_select(0, steps[j])
        cur = torch.bmm(blocks_t[j], gathered.reshape(n, b, -1)).view(n * b, -1)
    return cur


def _step_inputs(xt: torch.Tensor, steps: tuple[Gather, ...], blocks: torch.Tensor) -> list[torch.Tensor]:
    """Each step's input blocks ``(n, b, N)``: ``m - 1`` products (the last step's output is never needed)."""
    m, n, b, _ = blocks.shape
    cur, inputs, blocks_t = xt, [], _row_major(blocks[:-1].mT)
    for j in range(m):
        gathered = cur if steps[j] is None else cur.index_select(0, steps[j])
        inputs.append(gathered.reshape(n, b, -1))
        if j < m - 1:
            cur = torch.bmm(blocks_t[j], inputs[-1]).view(n * b, -1)
    return inputs


class BlockChain(torch.autograd.Function):
    """Rows ``x`` through ``m`` steps, each a feature gather then a block-diagonal product, then a final gather.

    ``blocks`` ``(m, n, b, b)`` in ``x``'s dtype; ``steps`` the ``m`` gathers (``None``: none) and
    ``final`` the last one, as index tensors on ``x``'s device; ``inverses`` the inverse
    permutations of ``steps + (final,)`` for backward. Returns ``(..., d)`` as a transposed view of a
    feature-major result.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        blocks: torch.Tensor,
        steps: tuple[Gather, ...],
        final: Gather,
        inverses: tuple[Gather, ...],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, blocks)
        ctx.plan = (steps, final, inverses)
        # in x's dtype even under autocast: backward runs outside the autocast region and must match
        with torch.autocast(x.device.type, enabled=False):
            cur = _chain_forward(_feature_major(x), steps, blocks)
        if final is not None:
            cur = cur.index_select(0, final)
        return cur.T.reshape(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, blocks = ctx.saved_tensors
        steps, final, inverses = ctx.plan
        m, n, b, _ = blocks.shape
        want_blocks = ctx.needs_input_grad[1]
        inputs = _step_inputs(_feature_major(x), steps, blocks) if want_blocks else []
        blocks = _row_major(blocks)
        g = _feature_major(grad)
        if final is not None:
            g = g.index_select(0, inverses[m])
        grad_blocks = torch.empty_like(blocks) if want_blocks else None
        for j in reversed(range(m)):
            g_out = g.reshape(n, b, -1)
            if want_blocks:
                # the product used R^T: dR = (dR^T)^T = (g_out step_in^T)^T
                grad_blocks[j] = torch.bmm(inputs[j], g_out.mT)
            g = torch.bmm(blocks[j], g_out).view(n * b, -1)
            if steps[j] is not None:
                g = g.index_select(0, inverses[j])
        grad_x = g.T.reshape(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_blocks, None, None, None


def _rows_by_block(x: torch.Tensor, b: int) -> torch.Tensor:
    """``(..., n b) -> (n, N, b)``: each block's slice of every row, a strided view (no copy)."""
    return x.reshape(-1, x.shape[-1] // b, b).transpose(0, 1)


def _product_into_rows(rows: torch.Tensor, blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``rows_i @ blocks_i`` for every block, written straight into a row-major tensor shaped like ``like``."""
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    torch.bmm(rows, blocks, out=_rows_by_block(out, blocks.shape[-1]))
    return out


class BlockRotation(torch.autograd.Function):
    """``x @ blockdiag(R_1..R_n)`` row-major in and out: the one-step, gather-free case of :class:`BlockChain`.

    Each block's slice of the rows is a strided view and the batched product writes its result
    through a strided view of a row-major output, so neither the activations nor their gradient are
    ever copied or transposed: the following layer and the layers before it get the row-major
    tensors they were written for. Saves only ``x`` and the blocks.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, blocks)
        with torch.autocast(x.device.type, enabled=False):
            return _product_into_rows(_rows_by_block(x, blocks.shape[-1]), _row_major(blocks), x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, blocks = ctx.saved_tensors
        b = blocks.shape[-1]
        grad_rows = _rows_by_block(grad, b)
        grad_blocks = torch.bmm(_rows_by_block(x, b).mT, grad_rows) if ctx.needs_input_grad[1] else None
        grad_x = _product_into_rows(grad_rows, _row_major(blocks.mT), x) if ctx.needs_input_grad[0] else None
        return grad_x, grad_blocks


def block_chain(
    x: torch.Tensor, blocks: torch.Tensor, steps: tuple[Gather, ...], final: Gather, inverses: tuple[Gather, ...]
) -> torch.Tensor:
    """:class:`BlockChain` on ``x``; ``blocks`` are cast to ``x``'s dtype here (never the activations)."""
    return BlockChain.apply(x, blocks.to(x.dtype), steps, final, inverses)


def rotate_blocks(x: torch.Tensor, rotations: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ blockdiag(R_1..R_n)`` on the last dim (``x @ blockdiag(R)^T`` with ``transpose``).

    ``rotations`` is ``(n, b, b)``; ``n == 1`` means one block shared by all ``d / b`` blocks.
    The rotation is cast to ``x``'s dtype here, after being built in float32; the cast is of the
    small blocks, never of the activations.
    """
    n, b, _ = rotations.shape
    d = x.shape[-1]
    if d % b or (n != 1 and n * b != d):
        raise ValueError(f"rotate_blocks: {n} blocks of size {b} do not fit {d} features.")
    rot = rotations.mT if transpose else rotations
    if n == 1:  # one shared block: a single (N d/b, b) x (b, b) product, row-major
        return (x.reshape(-1, b) @ rot[0].to(x.dtype)).reshape(x.shape)
    return BlockRotation.apply(x, rot.to(x.dtype))


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
