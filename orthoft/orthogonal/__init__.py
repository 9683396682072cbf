"""Pure tensor math shared by every orthoft method: skew packing, Cayley maps, block and butterfly rotations."""

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
from .skew import block_size_from_packed, pack_skew, packed_size, unpack_skew

__all__ = [
    "DEFAULT_MAX_SKEW_NORM",
    "DEFAULT_NEUMANN_DEGREE",
    "apply_butterfly",
    "block_diagonal",
    "block_size_from_packed",
    "bound_skew_norm",
    "butterfly_dense",
    "butterfly_indices",
    "butterfly_permutation",
    "cayley_exact",
    "cayley_neumann",
    "drop_blocks",
    "orthogonality_error",
    "pack_skew",
    "packed_size",
    "rotate_blocks",
    "rotation_from_packed",
    "unpack_skew",
]
