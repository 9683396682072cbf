"""Cayley maps from skew-symmetric to orthogonal matrices, batched over blocks.

One sign convention for every variant: ``R = (I + Q)(I - Q)^{-1}``. The Neumann variant
truncates ``(I - Q)^{-1} = I + Q + Q^2 + ...`` at degree ``k`` (the highest power of ``Q``),
so a rotation trained with one map is the same rotation (up to truncation) under the other.

With ``S_k = I + Q + ... + Q^k`` and ``R = (I + Q) S_k`` one has
``R^T R = (I - (-Q)^{k+1})(I - Q^{k+1})``, so the orthogonality error is ``2|Q|^{k+1}`` for
odd ``k`` but only ``|Q|^{2k+2}`` for even ``k``: even degrees are far better at equal cost,
hence the default ``k = 4``. The series diverges once ``|Q|_2 >= 1``; :func:`bound_skew_norm`
keeps every block inside a Frobenius ball that bounds the spectral norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .skew import unpack_skew, upper_entries

DEFAULT_NEUMANN_DEGREE = 4
DEFAULT_MAX_SKEW_NORM = 0.9


def _eye_like(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)


def cayley_exact(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform ``(I + Q)(I - Q)^{-1}`` of skew ``q`` with shape ``(..., b, b)``.

    Computed as ``(I - Q)^{-1}(I + Q)`` (the factors commute), in float32 at least.
    """
    q32 = q.to(torch.promote_types(q.dtype, torch.float32))
    eye = _eye_like(q32)
    return torch.linalg.solve(eye - q32, eye + q32)


def cayley_neumann(q: torch.Tensor, degree: int = DEFAULT_NEUMANN_DEGREE) -> torch.Tensor:
    """Cayley-Neumann approximation ``(I + Q)(I + Q + ... + Q^degree)`` of :func:`cayley_exact`.

    Expanded as ``I + 2Q + 2Q^2 + ... + 2Q^degree + Q^(degree+1)``: ``degree`` batched matmuls.
    ``degree=0`` gives ``I + Q`` (first order). PEFT's ``num_cayley_neumann_terms=t`` equals
    ``degree = t - 2``.
    """
    if degree < 0:
        raise ValueError(f"Neumann degree must be >= 0, got {degree}")
    q32 = q.to(torch.promote_types(q.dtype, torch.float32))
    rotation = _eye_like(q32) + q32
    if degree == 0:
        return rotation
    rotation = rotation + q32  # I + 2Q
    power = q32
    for step in range(2, degree + 2):
        power = power @ q32
        rotation = rotation + (power if step == degree + 1 else 2.0 * power)
    return rotation


def bound_skew_norm(q: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Rescale each ``(b, b)`` block whose Frobenius norm exceeds ``max_norm`` back onto that sphere.

    The Frobenius norm bounds the spectral norm, so ``max_norm < 1`` keeps the Neumann series
    convergent. Blocks inside the ball pass unchanged (identity map and identity gradient).
    """
    if max_norm is None:
        return q
    norms = torch.linalg.matrix_norm(q.to(torch.promote_types(q.dtype, torch.float32)), ord="fro", keepdim=True)
    scale = torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
    return q * scale.to(q.dtype)


class _PackedCayleyNeumann(torch.autograd.Function):
    """Packed skew entries to the bounded Cayley-Neumann rotation, as one autograd node.

    The same map as ``cayley_neumann(bound_skew_norm(unpack_skew(p)))`` with the series in Horner
    form ``R = I + Q(2I + Q(2I + ... (2I + Q)))`` (``degree`` products) and its gradient written out
    (``2 degree`` products). Built once per adapted layer and step, the unfused map is ~20 small
    autograd nodes whose bookkeeping costs more than their arithmetic.
    """

    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, degree: int, max_norm: float | None) -> torch.Tensor:
        with torch.autocast(packed.device.type, enabled=False):  # float32 whatever the surrounding autocast
            return _PackedCayleyNeumann._build(ctx, packed, degree, max_norm)

    @staticmethod
    def _build(ctx: Any, packed: torch.Tensor, degree: int, max_norm: float | None) -> torch.Tensor:
        scale = None
        if max_norm is not None:
            # |Q|_F = sqrt(2) |p|: the bound needs no unpacked matrix
            norms = packed.norm(dim=-1, keepdim=True) * math.sqrt(2.0)
            scale = torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
        q = unpack_skew(packed if scale is None else packed * scale)
        eye = _eye_like(q)
        horner = []
        if degree >= 1:
            horner.append(2.0 * eye + q)
            for _ in range(degree - 1):
                horner.append(2.0 * eye + q @ horner[-1])
        rotation = eye + (q @ horner[-1] if horner else q)
        ctx.save_for_backward(packed, q, scale if scale is not None else packed.new_ones(()), *horner)
        ctx.bounded = scale is not None
        return rotation

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        packed, q, scale, *horner = ctx.saved_tensors
        if not horner:
            grad_q = grad
        else:
            grad_q = grad @ horner[-1].mT
            grad_h = -(q @ grad)  # Q^T = -Q
            for lower in reversed(horner[:-1]):
                grad_q = grad_q + grad_h @ lower.mT
                grad_h = -(q @ grad_h)
            grad_q = grad_q + grad_h
        grad_packed = upper_entries(grad_q) - upper_entries(grad_q.mT)
        if ctx.bounded:
            # p_b = s p with s = min(1, c / |Q|): where s < 1 the map is the projection s (I - p p^T / |p|^2)
            squared = packed.square().sum(-1, keepdim=True).clamp_min(torch.finfo(packed.dtype).tiny)
            radial = (grad_packed * packed).sum(-1, keepdim=True) / squared
            grad_packed = torch.where(scale < 1.0, scale * (grad_packed - radial * packed), grad_packed)
        return grad_packed, None, None


def rotation_from_packed(
    packed: torch.Tensor,
    *,
    exact: bool = False,
    neumann_degree: int = DEFAULT_NEUMANN_DEGREE,
    max_norm: float | None = DEFAULT_MAX_SKEW_NORM,
) -> torch.Tensor:
    """Packed skew entries ``(..., b(b-1)/2)`` to rotations ``(..., b, b)`` in float32 (float64 stays float64).

    The norm bound applies to both maps so that switching ``exact`` never changes which
    rotation a set of parameters means. The Neumann map is one autograd node (see
    :class:`_PackedCayleyNeumann`).
    """
    work = packed.to(torch.promote_types(packed.dtype, torch.float32))
    if exact:
        return cayley_exact(bound_skew_norm(unpack_skew(work), max_norm))
    if neumann_degree < 0:
        raise ValueError(f"Neumann degree must be >= 0, got {neumann_degree}")
    return _PackedCayleyNeumann.apply(work, neumann_degree, max_norm)


def orthogonality_error(rotation: torch.Tensor) -> torch.Tensor:
    """``max |R^T R - I|`` over all entries of a batch of square matrices (a 0-d tensor)."""
    r32 = rotation.float()
    gram = r32.transpose(-1, -2) @ r32
    return (gram - _eye_like(gram)).abs().amax()
