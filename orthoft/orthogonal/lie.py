"""Lie-algebra coordinates of the rotations orthoft stores, and the projections used to merge adapters.

Cayley generators. A skew ``Q`` stands for ``R = Cayley(Q) = (I + Q)(I - Q)^{-1}``. ``Q`` is normal:
``Q = V diag(i lam) V^H`` with real ``lam``, so ``R = V diag((1 + i lam) / (1 - i lam)) V^H =
V diag(exp(2i arctan lam)) V^H``. Hence, as matrix functions of skew matrices,

* ``log Cayley(Q) = 2 artanh(Q)`` (eigenvalues ``2i arctan lam``): the canonical Lie-algebra
  coordinates of the rotation, defined for every skew ``Q``;
* ``Cayley^{-1}(exp X) = tanh(X / 2)`` (eigenvalues ``i tan(mu / 2)``), defined while every rotation
  angle ``|mu|`` stays below pi (a rotation with eigenvalue -1 has no Cayley generator);
* ``Cayley(Q)^t = Cayley(tanh(t artanh Q))``.

Both maps go through the Hermitian eigendecomposition of ``-iQ`` in float64, which is stable for
repeated eigenvalues, and return exactly skew results. Products of rotations come back to a
generator through :func:`inverse_cayley`.

Quasi-orthogonal 2x2 blocks (qGOFT). A block with positive determinant factors uniquely as
``B = Rot(theta) P`` (polar decomposition, ``P`` symmetric positive definite). Its coordinates are
``(theta, L00, L01, L11)`` with ``L = log P``: the rotation's Lie-algebra coordinate and the
log-Euclidean coordinates of the stretch. The identity block has coordinates 0, and a block is
orthogonal exactly when ``L = 0``.

Sequential projection. :func:`projection_coefficients` turns the Gram matrix of task vectors
``v_1..v_n`` into the coefficients ``a`` of ``sum_k w_k (v_k - proj_{span(v_1..v_{k-1})} v_k) =
sum_j a_j v_j``, so the projection can be applied to any coordinates that are linear in the ``v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .skew import pack_skew, unpack_skew

# a merged rotation angle this close to pi is refused: its Cayley generator would be huge or undefined
MAX_CAYLEY_ANGLE = math.pi * (1 - 1e-6)


def _skew_function(skew: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``V diag(i fn(lam)) V^H`` for skew ``skew = V diag(i lam) V^H`` (float64, (..., b, b))."""
    hermitian = -1j * skew.to(torch.complex128)
    lam, vectors = torch.linalg.eigh(hermitian)
    values = (1j * fn(lam)).to(torch.complex128)
    result = (vectors * values[..., None, :]) @ vectors.mH
    real = result.real
    return 0.5 * (real - real.transpose(-1, -2))  # exactly skew, whatever the rounding


def cayley_log(packed: torch.Tensor) -> torch.Tensor:
    """Packed ``log Cayley(Q) = 2 artanh(Q)`` of packed skew ``Q`` ((..., b(b-1)/2), float64)."""
    if packed.shape[-1] == 0:
        return packed.double()
    return pack_skew(_skew_function(unpack_skew(packed.double()), lambda lam: 2.0 * torch.atan(lam)))


def max_rotation_angle(log_packed: torch.Tensor) -> torch.Tensor:
    """Largest rotation angle (radians) of each ``exp(X)`` for packed skew ``X`` ((...,) float64)."""
    if log_packed.shape[-1] == 0:
        return log_packed.new_zeros(log_packed.shape[:-1], dtype=torch.float64)
    lam = torch.linalg.eigvalsh(-1j * unpack_skew(log_packed.double()).to(torch.complex128))
    return lam.abs().amax(-1)


def cayley_from_log(log_packed: torch.Tensor, where: str = "merge") -> torch.Tensor:
    """Packed ``Cayley^{-1}(exp X) = tanh(X / 2)`` of packed skew ``X`` (float64).

    Raises a ValueError when a rotation angle of ``exp(X)`` reaches pi: no Cayley generator exists.
    """
    if log_packed.shape[-1] == 0:
        return log_packed.double()
    angle = max_rotation_angle(log_packed)
    if bool((angle >= MAX_CAYLEY_ANGLE).any()):
        raise ValueError(
            f"{where}: a merged rotation turns by {float(angle.max()):.4f} rad (>= pi), which no Cayley generator "
            "represents. Fix: use smaller weights (e.g. weights summing to 1)."
        )
    return pack_skew(_skew_function(unpack_skew(log_packed.double()), lambda mu: torch.tan(0.5 * mu)))


def inverse_cayley(rotation: torch.Tensor, where: str = "merge") -> torch.Tensor:
    """Packed generator ``Q = (R - I)(R + I)^{-1}`` of rotations ``R`` ((..., b, b) -> float64 packed).

    Exact for orthogonal ``R`` without eigenvalue -1; a ValueError names the block when ``R + I`` is
    (nearly) singular.
    """
    r64 = rotation.double()
    eye = torch.eye(r64.shape[-1], dtype=torch.float64, device=r64.device).expand_as(r64)
    smallest = torch.linalg.svdvals(r64 + eye)[..., -1] if r64.shape[-1] else r64.new_ones(r64.shape[:-2])
    if bool((smallest < 1e-6).any()):
        raise ValueError(
            f"{where}: the composed rotation has an eigenvalue -1 (a half turn), which no Cayley generator "
            "represents. Fix: merge with combination_type='lie' or leave one adapter out."
        )
    generator = torch.linalg.solve(r64 + eye, r64 - eye, left=False)
    return pack_skew(generator)


def rotation_from_log(log_packed: torch.Tensor) -> torch.Tensor:
    """Dense ``exp(X)`` (float64) of packed skew ``X``."""
    return torch.linalg.matrix_exp(unpack_skew(log_packed.double()))


# ---- quasi-orthogonal 2x2 blocks ---------------------------------------------------------------


def polar_coordinates(blocks: torch.Tensor, where: str = "merge") -> torch.Tensor:
    """``(..., 2, 2)`` blocks with positive determinant -> ``(..., 4)`` coordinates ``(theta, L00, L01, L11)``."""
    b64 = blocks.double()
    det = torch.linalg.det(b64)
    if bool((det <= 0).any()):
        raise ValueError(
            f"{where}: {int((det <= 0).sum())} quasi-Givens block(s) have determinant <= 0 (a reflection or "
            "a collapse); they have no rotation-times-stretch form. Fix: merge strict GOFT adapters, or "
            "retrain with a larger reg_lambda."
        )
    u, s, vh = torch.linalg.svd(b64)
    rotation = u @ vh
    theta = torch.atan2(rotation[..., 1, 0], rotation[..., 0, 0])
    log_stretch = (vh.mT * torch.log(s)[..., None, :]) @ vh
    return torch.stack((theta, log_stretch[..., 0, 0], log_stretch[..., 0, 1], log_stretch[..., 1, 1]), -1)


def blocks_from_polar(coords: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`polar_coordinates`: ``Rot(theta) exp(L)`` as ``(..., 2, 2)`` float64 blocks."""
    c64 = coords.double()
    theta = c64[..., 0]
    log_stretch = torch.stack(
        (torch.stack((c64[..., 1], c64[..., 2]), -1), torch.stack((c64[..., 2], c64[..., 3]), -1)), -2
    )
    values, vectors = torch.linalg.eigh(log_stretch)
    stretch = (vectors * torch.exp(values)[..., None, :]) @ vectors.mT
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotation = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)
    return rotation @ stretch


def wrap_angle(angles: torch.Tensor) -> torch.Tensor:
    """Angles mapped into (-pi, pi] (the same rotations)."""
    return torch.atan2(torch.sin(angles), torch.cos(angles))


# ---- sequential projection ---------------------------------------------------------------------


def projection_coefficients(gram: torch.Tensor, weights: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Coefficients ``a`` of the sequentially projected weighted sum, for a batch of Gram matrices.

    ``gram`` (..., n, n) holds the inner products of task vectors ``v_1..v_n`` (one batch entry per
    independent unit, e.g. a rotation block). Task ``k`` keeps only its component orthogonal to
    ``span(v_1..v_{k-1})``: ``p_k = v_k - sum_{j<k} c_kj v_j`` with ``G[:k,:k] c_k = G[:k,k]``
    (pseudo-inverse: dependent or zero vectors are fine). Returns ``a`` (..., n) with
    ``sum_k w_k p_k = sum_j a_j v_j``.
    """
    g64 = gram.double()
    n = g64.shape[-1]
    w = weights.double().to(g64.device)
    coeffs = torch.zeros_like(g64)  # coeffs[..., k, j] = c_kj
    for k in range(1, n):
        earlier = g64[..., :k, :k]
        scale = earlier.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).clamp_min(1e-300)
        pinv = torch.linalg.pinv(earlier / scale[..., None], rtol=rtol, hermitian=True) / scale[..., None]
        coeffs[..., k, :k] = (pinv @ g64[..., :k, k : k + 1])[..., 0]
    return w.expand(g64.shape[:-1]) - (w[..., :, None] * coeffs).sum(-2)


__all__ = [
    "MAX_CAYLEY_ANGLE",
    "blocks_from_polar",
    "cayley_from_log",
    "cayley_log",
    "inverse_cayley",
    "max_rotation_angle",
    "polar_coordinates",
    "projection_coefficients",
    "rotation_from_log",
    "wrap_angle",
]
