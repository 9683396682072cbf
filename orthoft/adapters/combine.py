"""How one adapter tensor of several adapters combines into one, by the tensor's declared role.

A layer class declares ``merge_roles`` (tensor dict name -> role) and, for shifts measured from a
frozen per-adapter value, ``merge_references`` (tensor -> buffer dict). The roles:

``"cayley"``      packed skew generators ``(..., b(b-1)/2)``, one rotation ``Cayley(Q)`` per leading index
                  (OFT blocks, PSOFT's core); the generator is taken after the config's norm bound, as
                  the layer uses it. Coordinates: ``log Cayley(Q) = 2 artanh(Q)``, per block.
``"butterfly"``   the same per butterfly factor ``(m, n, b(b-1)/2)`` (BOFT); composes only when ``m = 1``.
``"angles"``      strict Givens angles (GOFT); coordinates: the angles (the Lie algebra of SO(2)).
``"quasi_blocks"`` free 2x2 blocks (qGOFT); coordinates: polar ``(theta, log stretch)``.
``"reflections"`` Householder vectors as columns (HRA); only composition (concatenation) is defined.
``"scale"``       a positive multiplicative vector, identity 1 (BOFT's ``s``, PSOFT's ``a``, ``b``);
                  coordinates ``log s`` (``s - 1`` for ``"linear"``).
``"shift"``       an additive tensor, identity 0 or the reference buffer (SVFT's values,
                  Orthogonal Adaptation's ``B``, CLOVER's cores ``S - S0``).

Every function here is pure: tensors in, float64 tensors out; :mod:`orthoft.adapters.merging`
walks the model and writes the results.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..orthogonal import bound_skew_norm, unpack_skew, upper_entries
from ..orthogonal.lie import (
    blocks_from_polar,
    cayley_from_log,
    cayley_log,
    inverse_cayley,
    polar_coordinates,
    projection_coefficients,
    rotation_from_log,
    wrap_angle,
)

ROLES = ("cayley", "butterfly", "angles", "quasi_blocks", "reflections", "scale", "shift")
GENERATOR_ROLES = ("cayley", "butterfly")
# relative floor added to Fisher weights so that coordinates no batch touched still get a weighted mean
FISHER_EPS = 1e-8


def bounded_generator(packed: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """The packed generator a layer actually uses: ``packed`` after the config's Frobenius bound (float64)."""
    bounded = bound_skew_norm(unpack_skew(packed.double()), max_norm)
    return upper_entries(bounded)


def to_coordinates(
    role: str,
    value: torch.Tensor,
    combination: str,
    reference: torch.Tensor | None = None,
    max_norm: float | None = None,
    where: str = "merge",
) -> torch.Tensor:
    """Float64 coordinates of one adapter's tensor in which ``combination`` is a weighted sum."""
    if role in GENERATOR_ROLES:
        return cayley_log(bounded_generator(value, max_norm))
    if role == "angles":
        return wrap_angle(value.double())
    if role == "quasi_blocks":
        return polar_coordinates(value, where)
    if role == "scale":
        if combination == "linear":
            return value.double() - 1.0
        if bool((value <= 0).any()):
            raise ValueError(
                f"{where}: {int((value <= 0).sum())} scale entries are <= 0; the geometric mean ({combination!r} "
                "works on log-scales) needs positive scales. Fix: use combination_type='linear' where the method "
                "allows it, or merge adapters whose scales stayed positive."
            )
        return torch.log(value.double())
    if role == "shift":
        return value.double() - (0.0 if reference is None else reference.double())
    raise ValueError(f"{where}: role {role!r} has no coordinates for {combination!r}")


def from_coordinates(
    role: str, coords: torch.Tensor, combination: str, reference: torch.Tensor | None = None, where: str = "merge"
) -> torch.Tensor:
    """Inverse of :func:`to_coordinates` (float64)."""
    if role in GENERATOR_ROLES:
        return cayley_from_log(coords, where)
    if role == "angles":
        return coords
    if role == "quasi_blocks":
        return blocks_from_polar(coords)
    if role == "scale":
        return coords + 1.0 if combination == "linear" else torch.exp(coords)
    if role == "shift":
        return coords + (0.0 if reference is None else reference.double())
    raise ValueError(f"{where}: role {role!r} has no coordinates for {combination!r}")


def fisher_for_coordinates(role: str, fisher: torch.Tensor, coords_shape: torch.Size) -> torch.Tensor:
    """Fisher weights of a stored tensor laid out like its coordinates.

    Entry-wise where coordinates and stored entries correspond (generators, angles, scales, shifts:
    the coordinate maps are entry-wise or near the identity for trained adapters); a 2x2 quasi block's
    four entries are summed into one weight for its four polar coordinates.
    """
    weights = fisher.double()
    if role == "quasi_blocks":
        weights = weights.sum((-1, -2))[..., None]
    return weights.expand(coords_shape)


def unit_shape(role: str, coords: torch.Tensor) -> tuple[int, ...]:
    """Leading dims that index independent units for projection: rotation blocks, else the whole tensor."""
    return tuple(coords.shape[:-1]) if role in GENERATOR_ROLES else ()


def weighted_sum(coords: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i c_i`` (the ``"lie"`` and ``"linear"`` rule in coordinates)."""
    return sum(w * c for w, c in zip(weights, coords))


def fisher_mean(
    coords: Sequence[torch.Tensor], weights: Sequence[float], fishers: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``sum_i w_i F_i c_i / sum_i w_i F_i`` entry-wise (Matena & Raffel), with a small relative floor on ``F``."""
    top = max(float(f.max()) for f in fishers) if fishers else 0.0
    eps = FISHER_EPS * top if top > 0 else 1.0
    numerator = sum(w * (f + eps) * c for w, f, c in zip(weights, fishers, coords))
    denominator = sum(w * (f + eps) for w, f in zip(weights, fishers))
    return numerator / denominator


def gram_of(coords: Sequence[torch.Tensor], units: tuple[int, ...]) -> torch.Tensor:
    """Gram matrices ``(*units, n, n)`` of the task vectors, one per unit."""
    flat = torch.stack([c.reshape(*units, -1) if units else c.reshape(-1) for c in coords], -2)
    return flat @ flat.transpose(-1, -2)


def projected_sum(coords: Sequence[torch.Tensor], weights: Sequence[float], gram: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k (c_k - proj_{span(c_1..c_{k-1})} c_k)`` with the projection defined by ``gram`` per unit."""
    coefficients = projection_coefficients(gram, torch.tensor(list(weights), dtype=torch.float64))
    units = gram.shape[:-2]
    stacked = torch.stack(list(coords), 0)  # (n, *coords_shape)
    extra = stacked.dim() - 1 - len(units)
    a = coefficients.movedim(-1, 0).reshape(len(coords), *units, *([1] * extra))
    return (a * stacked).sum(0)


# ---- composition ---------------------------------------------------------------------------------


def compose_generators(
    values: Sequence[torch.Tensor], weights: Sequence[float], max_norms: Sequence[float | None], where: str
) -> torch.Tensor:
    """Generator of ``R_n^{w_n} ... R_1^{w_1}`` per block (``R_i = Cayley(Q_i)``, exact Cayley rotations)."""
    product = None
    for value, weight, max_norm in zip(values, weights, max_norms):
        rotation = rotation_from_log(weight * cayley_log(bounded_generator(value, max_norm)))
        product = rotation if product is None else rotation @ product
    return inverse_cayley(product, where)


def compose_scales(values: Sequence[torch.Tensor], weights: Sequence[float], where: str) -> torch.Tensor:
    """``prod_i s_i^{w_i}`` (the output scales of maps applied one after the other)."""
    result = torch.ones_like(values[0], dtype=torch.float64)
    for value, weight in zip(values, weights):
        result = result * torch.pow(value.double(), weight)
    if not bool(torch.isfinite(result).all()):
        raise ValueError(
            f"{where}: a fractional power of a negative scale is undefined. Fix: use weights 1 with 'compose', "
            "or 'lie'."
        )
    return result


def compose_reflections(values: Sequence[torch.Tensor], weights: Sequence[float], where: str) -> torch.Tensor:
    """Householder vectors of ``H_1 H_2 ... H_n`` (each ``H_i`` a product of reflections): columns concatenated."""
    for weight in weights:
        if weight != 1:
            raise ValueError(
                f"{where}: a product of reflections has no fractional power; 'compose' takes weights 0 (leave the "
                f"adapter out) or 1 (include it), got {weight}. Fix: use weights of 0 or 1."
            )
    return torch.cat([v.double() for v in values], -1)


def compose_shifts(
    values: Sequence[torch.Tensor], weights: Sequence[float], reference: torch.Tensor | None
) -> torch.Tensor:
    """Additive updates applied one after the other add up: ``ref + sum_i w_i (p_i - ref)``."""
    return from_coordinates(
        "shift",
        weighted_sum([to_coordinates("shift", v, "compose", reference) for v in values], weights),
        "compose",
        reference,
    )


__all__ = [
    "FISHER_EPS",
    "GENERATOR_ROLES",
    "ROLES",
    "bounded_generator",
    "compose_generators",
    "compose_reflections",
    "compose_scales",
    "compose_shifts",
    "fisher_for_coordinates",
    "fisher_mean",
    "from_coordinates",
    "gram_of",
    "projected_sum",
    "to_coordinates",
    "unit_shape",
    "weighted_sum",
]
