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

from .skew import skew_entries, unpack_skew

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


def _even_odd_coefficients(degree: int) -> tuple[list[float], list[float]]:
    """``I + 2Q + ... + 2Q^degree + Q^(degree+1)`` as ``E(P) + Q O(P)``, ``P = Q^2``: E's and O's coefficients."""
    coefficients = [1.0] + [2.0] * degree + [1.0] if degree >= 1 else [1.0, 1.0]
    return coefficients[0::2], coefficients[1::2]


def _combine(coefficients: list[float], powers: list[torch.Tensor], eye: torch.Tensor) -> torch.Tensor:
    """``sum_j c_j P^j`` from ``powers = [P, P^2, ...]`` (no products)."""
    total = eye * coefficients[0]
    for c, power in zip(coefficients[1:], powers, strict=False):
        total = torch.add(total, power, alpha=c)
    return total


class _PackedCayleyNeumann(torch.autograd.Function):
    """Packed skew entries to the bounded Cayley-Neumann rotation, as one autograd node.

    The same map as ``cayley_neumann(bound_skew_norm(unpack_skew(p)))``, evaluated in the square
    ``P = Q^2``: ``R = E(P) + Q O(P)`` with the even and odd coefficients of the series. ``P`` is
    symmetric and every direction ``dP = dQ Q + Q dQ`` of a skew ``dQ`` is symmetric too, so the
    gradient only needs the symmetric part of each upstream matrix, and a symmetric ``V`` gives
    ``V Q^T + Q^T V = -(VQ - (VQ)^T)``: one product instead of two. Degree 4 (the default) costs 3
    batched products forward and 5 backward where Horner in ``Q`` costs 4 and 8; on the small
    blocks of a rotation the products are the build's whole cost. Built once per adapted layer and
    step, the unfused map would be ~20 small autograd nodes whose bookkeeping costs more than their
    arithmetic.
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
        shape = q.shape
        q = q.reshape(-1, shape[-2], shape[-1])
        eye = torch.eye(shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
        even, odd = _even_odd_coefficients(degree)
        powers = [torch.bmm(q, q)] if len(even) > 1 or len(odd) > 1 else []
        while len(powers) < max(len(even), len(odd)) - 1:
            powers.append(torch.bmm(powers[-1], powers[0]))
        odd_part = _combine(odd, powers, eye)
        rotation = torch.baddbmm(_combine(even, powers, eye), q, odd_part)
        ctx.save_for_backward(packed, q, scale if scale is not None else packed.new_ones(()), odd_part, *powers)
        ctx.bounded = scale is not None
        ctx.coefficients = (even, odd)
        return rotation.view(shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        packed, q, scale, odd_part, *powers = ctx.saved_tensors
        even, odd = ctx.coefficients
        shape = grad.shape
        grad = grad.reshape(q.shape)
        # the skew part of grad_Q is all the packed entries see; K - K^T is built from K at the end
        skew_source = torch.bmm(grad, odd_part)  # G O^T, O symmetric
        if powers:
            grad_odd = torch.bmm(q.mT, grad)
            coefficient = lambda cs, j: cs[j] if j < len(cs) else 0.0  # noqa: E731
            upstream = [
                torch.add(grad * coefficient(even, j), grad_odd, alpha=coefficient(odd, j))
                for j in range(1, len(powers) + 1)
            ]
            # sum_j sum_{a+b=j-1} P^a U_j P^b: Horner from the left, then from the right
            left = [upstream[-1]]
            for u in reversed(upstream[:-1]):
                left.insert(0, torch.baddbmm(u, powers[0], left[0]))
            grad_p = left[-1]
            for a in reversed(left[:-1]):
                grad_p = torch.baddbmm(a, grad_p, powers[0])
            # through P = Q Q with S = grad_P + grad_P^T (twice its symmetric part): the skew part of
            # -(sym(grad_P) Q + Q sym(grad_P)) is that of -S Q
            skew_source = torch.baddbmm(skew_source, grad_p + grad_p.mT, q, alpha=-1.0)
        grad_packed = skew_entries(skew_source.view(shape))
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
