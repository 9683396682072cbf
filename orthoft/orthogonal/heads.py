"""Per-head factorizations of attention projections into orthonormal bases and small cores (CLOVER).

The factorizations (:func:`qr_rows`, :func:`qr_columns`, :func:`joint_value_output`,
:func:`joint_query_key`) take a batch of heads (leading dim ``G``, float64) and return
``(s0, left, right)``: the initial core ``S0_g`` and the frozen ``d_head x d_head`` matrices of the
per-head transform ``T_g = I + left_g (S_g - S0_g) right_g`` that makes a trained core ``S_g`` the
same model as the original projection followed (or, for input-side heads, preceded) by ``T_g``.
``T_g = I`` exactly while ``S_g = S0_g``.

The builders (:func:`qr_head_factors`, :func:`query_key_factors`, :func:`value_output_factors`,
:func:`fused_qkv_factors`) cut a dense ``(out, in)`` projection weight into heads by a
:class:`HeadLayout` and return :class:`HeadFactors`; their errors name the module (``where``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class HeadFactors:
    """Frozen factors of one projection: ``T_g = I + left_g (S_g - s0_g) right_g`` per head group ``g``.

    ``side`` is ``"output"`` (``T`` acts on the head's slice of the output) or ``"input"`` (on the
    head's slice of the input). ``starts[g]`` is where group ``g``'s ``head_dim`` features begin.
    """

    side: Literal["output", "input"]
    starts: list[int]
    head_dim: int
    s0: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor


def positive_qr(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR of ``(..., m, n)`` matrices with a positive diagonal in ``R`` (unique for full column rank)."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs[..., None, :], r * signs[..., :, None]


def batched_identity(batch: torch.Tensor) -> torch.Tensor:
    """Identity matrices shaped, typed and placed like the square stack ``batch`` (a fresh tensor)."""
    return torch.eye(batch.shape[-1], dtype=batch.dtype, device=batch.device).expand_as(batch).clone()


def qr_rows(heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads ``W_h`` (G, dh, in) as ``S0_h B_h`` with ``B_h`` orthonormal rows: returns ``(s0, left, right)``.

    ``W_h' = S_h B_h = (I + (S_h - S0_h) S0_h^{-1}) W_h``: ``left = I``, ``right = S0^{-1}``.
    """
    _, r = positive_qr(heads.mT)
    s0 = r.mT  # lower triangular
    return s0, batched_identity(s0), torch.linalg.inv(s0)


def qr_columns(heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads ``W_h`` (G, out, dh) as ``B_h S0_h`` with ``B_h`` orthonormal columns.

    ``W_h' = B_h S_h = W_h (I + S0_h^{-1} (S_h - S0_h))``: ``left = S0^{-1}``, ``right = I``.
    """
    _, r = positive_qr(heads)
    return r, torch.linalg.inv(r), batched_identity(r)


def joint_value_output(values: torch.Tensor, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per head ``W_O^h W_V^h = U diag(sigma) V^T`` from ``values`` (G, dh, in) and ``outputs`` (G, out, dh).

    The core sits on V: ``W_O^h T_h W_V^h = U S_h V^T`` with ``T_h = I + D^{-1} (S_h - diag(sigma)) C^{-1}``,
    ``C = W_V^h V`` and ``D = U^T W_O^h``. Computed from two thin QRs and a ``dh x dh`` SVD, never
    forming the ``out x in`` product.
    """
    _, r_v = positive_qr(values.mT)  # W_V^T = Q_v R_v
    _, r_o = positive_qr(outputs)  # W_O = Q_o R_o
    u, sigma, wh = torch.linalg.svd(r_o @ r_v.mT)
    c = r_v.mT @ wh.mT  # W_V V
    d = u.mT @ r_o  # U^T W_O
    return torch.diag_embed(sigma), torch.linalg.inv(d), torch.linalg.inv(c)


def joint_query_key(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per head ``W_Q^h^T W_K^h = U diag(sigma) V^T`` from ``queries`` and matching ``keys`` (G, dh, in).

    The core sits on Q: scores ``x^T U S_h^T V^T y`` need ``T_h = I + C^{-T} (S_h - diag(sigma)) A^{-1}``
    with ``A = W_Q^h U`` and ``C = W_K^h V``.
    """
    _, r_q = positive_qr(queries.mT)
    _, r_k = positive_qr(keys.mT)
    u, sigma, wh = torch.linalg.svd(r_q @ r_k.mT)
    a = r_q.mT @ u
    c = r_k.mT @ wh.mT
    return torch.diag_embed(sigma), torch.linalg.inv(c).mT, torch.linalg.inv(a)


@dataclass
class HeadLayout:
    """Attention head layout: ``num_heads`` query heads, ``num_kv_heads`` key/value heads of ``head_dim``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary: bool  # rotary position embeddings sit between Q and K, so the pair cannot be factored jointly

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


def check_head_features(where: str, features: int, expected: int, what: str) -> None:
    """Raise, naming module ``where``, when a projection's ``features`` do not match the head layout."""
    if features != expected:
        raise ValueError(
            f"CLOVER: {where} has {features} {what} features but the head layout needs {expected}. "
            "Fix: pass num_heads, num_kv_heads and head_dim matching the model to CLOVERConfig."
        )


def checked_head_factors(
    where: str, side: str, starts: list[int], head_dim: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> HeadFactors:
    """``HeadFactors`` from ``(s0, left, right)``; raises when a head was rank-deficient (non-finite factors)."""
    s0, left, right = parts
    if not all(torch.isfinite(t).all() for t in parts):
        raise ValueError(
            f"CLOVER: a head of {where} is rank-deficient, so it has no orthonormal {head_dim}-dim basis. "
            "Fix: exclude this module (exclude_modules=[...])."
        )
    return HeadFactors(side, starts, head_dim, s0, left, right)  # type: ignore[arg-type]


def qr_head_factors(where: str, weight: torch.Tensor, heads: int, head_dim: int, side: str) -> HeadFactors:
    """Each head of ``weight`` (out, in) factored alone by QR: its output rows (``side="output"``) or input columns."""
    if side == "output":
        check_head_features(where, weight.shape[0], heads * head_dim, "output")
        parts = qr_rows(weight.reshape(heads, head_dim, weight.shape[1]))
    else:
        check_head_features(where, weight.shape[1], heads * head_dim, "input")
        parts = qr_columns(weight.reshape(weight.shape[0], heads, head_dim).transpose(0, 1))
    return checked_head_factors(where, side, [h * head_dim for h in range(heads)], head_dim, parts)


def query_key_factors(
    where: str, queries: torch.Tensor, keys: torch.Tensor, layout: HeadLayout, start: int = 0
) -> HeadFactors:
    """Joint Q-K factors per query head (keys repeated over their query group); the core sits on Q."""
    n, dh = layout.num_heads, layout.head_dim
    check_head_features(where, queries.shape[0], n * dh, "query output")
    check_head_features(where, keys.shape[0], layout.num_kv_heads * dh, "key output")
    q_heads = queries.reshape(n, dh, -1)
    k_heads = keys.reshape(layout.num_kv_heads, dh, -1).repeat_interleave(layout.group_size, dim=0)
    parts = joint_query_key(q_heads, k_heads)
    return checked_head_factors(where, "output", [start + h * dh for h in range(n)], dh, parts)


def value_output_factors(
    where: str, values: torch.Tensor, outputs: torch.Tensor, layout: HeadLayout, start: int = 0
) -> HeadFactors:
    """Joint V-O factors per head (``values`` (out_v, in), ``outputs`` (out, in_o)); the core sits on V."""
    n, dh = layout.num_heads, layout.head_dim
    check_head_features(where, values.shape[0], n * dh, "value output")
    check_head_features(where, outputs.shape[1], n * dh, "output-projection input")
    v_heads = values.reshape(n, dh, -1)
    o_heads = outputs.reshape(outputs.shape[0], n, dh).transpose(0, 1)
    parts = joint_value_output(v_heads, o_heads)
    return checked_head_factors(where, "output", [start + h * dh for h in range(n)], dh, parts)


def fused_qkv_factors(
    where: str, weight: torch.Tensor, layout: HeadLayout, outputs: torch.Tensor | None
) -> HeadFactors:
    """Factors of a fused ``[q; k; v]`` projection, all on its output rows.

    Q-K jointly unless ``layout.rotary`` (then each by QR); V jointly with ``outputs`` (the output
    projection's weight) when given and there is no grouped-query attention, else by QR.
    """
    n, kv, dh = layout.num_heads, layout.num_kv_heads, layout.head_dim
    check_head_features(where, weight.shape[0], (n + 2 * kv) * dh, "output (fused q, k, v)")
    q, k, v = weight.split([n * dh, kv * dh, kv * dh])
    k_start, v_start = n * dh, (n + kv) * dh
    pieces = []
    if layout.rotary:
        pieces.append(qr_head_factors(where, q, n, dh, "output"))
        k_factors = qr_head_factors(where, k, kv, dh, "output")
        k_factors.starts = [k_start + s for s in k_factors.starts]
        pieces.append(k_factors)
    else:
        pieces.append(query_key_factors(where, q, k, layout, start=0))
    if outputs is not None and layout.group_size == 1:
        pieces.append(value_output_factors(where, v, outputs, layout, start=v_start))
    else:
        v_factors = qr_head_factors(where, v, kv, dh, "output")
        v_factors.starts = [v_start + s for s in v_factors.starts]
        pieces.append(v_factors)
    return dataclasses.replace(
        pieces[0],
        starts=[s for p in pieces for s in p.starts],
        s0=torch.cat([p.s0 for p in pieces]),
        left=torch.cat([p.left for p in pieces]),
        right=torch.cat([p.right for p in pieces]),
    )


__all__ = [
    "HeadFactors",
    "HeadLayout",
    "batched_identity",
    "check_head_features",
    "checked_head_factors",
    "fused_qkv_factors",
    "joint_query_key",
    "joint_value_output",
    "positive_qr",
    "qr_columns",
    "qr_head_factors",
    "qr_rows",
    "query_key_factors",
    "value_output_factors",
]
