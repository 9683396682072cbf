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

import torch

from .skew import unpack_skew

DEFAULT_NEUMANN_DEGREE = 4
DEFAULT_MAX_SKEW_NORM = 0.9


def _eye_like(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)


def cayley_exact(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform ``(I + Q)(I - Q)^{-1}`` of skew ``q`` with shape ``(..., b, b)``.

    Computed as ``(I - Q)^{-1}(I + Q)`` (the factors commute), in float32 whatever the input dtype.
    """
    q32 = q.float()
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
    q32 = q.float()
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
    norms = torch.linalg.matrix_norm(q.float(), ord="fro", keepdim=True)
    scale = torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
    return q * scale.to(q.dtype)


def rotation_from_packed(
    packed: torch.Tensor,
    *,
    exact: bool = False,
    neumann_degree: int = DEFAULT_NEUMANN_DEGREE,
    max_norm: float | None = DEFAULT_MAX_SKEW_NORM,
) -> torch.Tensor:
    """Packed skew entries ``(..., b(b-1)/2)`` to float32 rotations ``(..., b, b)``.

    The norm bound applies to both maps so that switching ``exact`` never changes which
    rotation a set of parameters means.
    """
    q = bound_skew_norm(unpack_skew(packed.float()), max_norm)
    return cayley_exact(q) if exact else cayley_neumann(q, neumann_degree)


def orthogonality_error(rotation: torch.Tensor) -> torch.Tensor:
    """``max |R^T R - I|`` over all entries of a batch of square matrices (a 0-d tensor)."""
    r32 = rotation.float()
    gram = r32.transpose(-1, -2) @ r32
    return (gram - _eye_like(gram)).abs().amax()
