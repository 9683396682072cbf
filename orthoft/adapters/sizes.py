"""Block sizes and ranks per layer, with errors that name the module and the sizes that would fit."""

from __future__ import annotations


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def resolve_block_size(
    method: str,
    module_name: str,
    features: int,
    block_size: int | None,
    num_blocks: int | None,
    multiple_of: int = 1,
) -> int:
    """Block size for one layer from ``block_size`` or ``num_blocks``, with an actionable error.

    ``multiple_of`` is the span one block pattern needs (e.g. ``b * 2^(m-1)`` for a butterfly).
    """
    if num_blocks:
        if features % num_blocks:
            raise ValueError(
                f"{method}: num_blocks {num_blocks} does not divide in_features {features} of {module_name}. "
                f"Fix: use a num_blocks among {_divisors(features)[:12]} or exclude the module."
            )
        block_size = features // num_blocks
    span = block_size * multiple_of
    if features % span:
        fitting = [k for k in _divisors(features) if features % (k * multiple_of) == 0 and k > 1]
        nearest = sorted(fitting, key=lambda k: abs(k - block_size))[:4]
        what = f"block size {block_size}" + (f" x {multiple_of}" if multiple_of > 1 else "")
        raise ValueError(
            f"{method}: {what} does not divide in_features {features} of {module_name}. "
            f"Fix: pick a block size such as {sorted(nearest)}, set num_blocks, or exclude the module."
        )
    return block_size


def check_rank(method: str, module_name: str, rank: int, out_features: int, in_features: int) -> None:
    """Raise a clear error when ``rank`` exceeds what an ``out x in`` weight has."""
    limit = min(out_features, in_features)
    if rank > limit:
        raise ValueError(
            f"{method}: rank {rank} exceeds min(out_features, in_features) = {limit} of {module_name} "
            f"({out_features} x {in_features}). Fix: lower the rank to <= {limit} or exclude the module."
        )
