"""The one table of floating dtypes orthoft accepts in recipes, CLI flags and APIs, and their resolution."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
FLOAT_DTYPES = frozenset(DTYPES.values())


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def auto_compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """What ``auto`` means: bfloat16 on a GPU that has it, float16 on other GPUs, float32 on CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def auto_mixed_precision() -> str:
    """Accelerate's ``mixed_precision`` for ``auto``: ``bf16``/``fp16`` on GPUs, ``no`` on CPU."""
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_dtype(
    value: str | torch.dtype | None, where: str = "dtype", default: torch.dtype | None = None
) -> torch.dtype | None:
    """A torch float dtype from a name (``fp32``, ``bfloat16``, ``torch.float16``, ``auto``) or a dtype.

    ``None`` gives ``default``; ``auto`` gives :func:`auto_compute_dtype`. Anything else raises a
    ValueError that names ``where`` and the valid names.
    """
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        if value not in FLOAT_DTYPES:
            raise ValueError(f"{where}: {value} is not a float dtype. Fix: use one of {sorted(DTYPES)}.")
        return value
    name = str(value).removeprefix("torch.")
    if name == "auto":
        return auto_compute_dtype()
    if name not in DTYPES:
        raise ValueError(f"{where}: dtype {value!r} is not known. Fix: use one of {sorted(DTYPES)} or auto.")
    return DTYPES[name]


__all__ = ["DTYPES", "FLOAT_DTYPES", "auto_compute_dtype", "auto_mixed_precision", "dtype_name", "resolve_dtype"]
