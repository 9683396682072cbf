"""Pure tensor math shared by every orthoft method: skew packing, Cayley maps, block, butterfly,
Givens and Householder rotations."""

from .blocks import block_diagonal, drop_blocks, rotate_blocks
from .butterfly import apply_butterfly, butterfly_dense, butterfly_indices, butterfly_permutation
from .cayley import (
    DEFAULT_MAX_SKEW_NORM,
    DEFAULT_NEUMANN_DEGREE,
    bound_skew_norm,
    cayley_exact,
    cayley_neumann,
    orthogonality_error,
    rotation_from_packed,
)
from .givens import (
    GivensPlan,
    angles_to_blocks,
    apply_givens,
    givens_matrix,
    givens_pairs,
    givens_plan,
    identity_blocks,
    invert_blocks,
    max_givens_layers,
    quasi_orthogonality_penalty,
)
from .householder import (
    apply_householder,
    apply_householder_sequential,
    apply_subspace_reflection,
    householder_matrix,
    householder_wy_factor,
    normalized_gram_penalty,
    orthonormal_basis,
)
from .skew import block_size_from_packed, pack_skew, packed_size, unpack_skew

__all__ = [
    "DEFAULT_MAX_SKEW_NORM",
    "DEFAULT_NEUMANN_DEGREE",
    "GivensPlan",
    "angles_to_blocks",
    "apply_butterfly",
    "apply_givens",
    "apply_householder",
    "apply_householder_sequential",
    "apply_subspace_reflection",
    "block_diagonal",
    "block_size_from_packed",
    "bound_skew_norm",
    "butterfly_dense",
    "butterfly_indices",
    "butterfly_permutation",
    "cayley_exact",
    "cayley_neumann",
    "drop_blocks",
    "givens_matrix",
    "givens_pairs",
    "givens_plan",
    "householder_matrix",
    "householder_wy_factor",
    "identity_blocks",
    "invert_blocks",
    "max_givens_layers",
    "normalized_gram_penalty",
    "orthogonality_error",
    "orthonormal_basis",
    "pack_skew",
    "packed_size",
    "quasi_orthogonality_penalty",
    "rotate_blocks",
    "rotation_from_packed",
    "unpack_skew",
]
