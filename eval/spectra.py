"""Random matrices with chosen singular values, shared by the Newton-Schulz benchmarks in eval/.

Scripts here run as ``python eval/<script>.py``, which puts eval/ on ``sys.path``: import this as
``from spectra import matrix_with_condition``. (The test suite keeps its own copy in tests/helpers.py.)
"""

from __future__ import annotations

import math

import torch


def matrix_with_condition(rows: int, cols: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    """A random ``rows x cols`` float32 matrix with log-spaced singular values from 1 to ``1/condition``."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    singular_values = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    return ((u * singular_values) @ v.T).float()
