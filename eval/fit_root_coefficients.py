"""Fit ROOT-style shape-specific Newton-Schulz quintics (offline; prints the table).

ROOT (He et al. 2025, arXiv 2511.20626) fits one quintic ``(a, b, c)`` per matrix shape so that
5 steps on ``X/|X|_F`` orthogonalize equally well at every size. It publishes coefficients only
for four LLM shapes with 2048 rows, far from adapter sizes (32x32 OFT blocks, d x r HRA
reflectors), so this script fits its own table per ``(min dim, aspect ratio)`` bucket.

Why the fit is cheap: an odd matrix polynomial acts on each singular value separately, so only
the singular values of ``X/|X|_F`` matter. For each bucket's representative shape ``m x n``
(m <= n) we build three spectra and minimize the mean of ``(p^5(sigma) - 1)^2`` over all of them:

- Gaussian gradient noise: Marchenko-Pastur quantiles for ratio ``m/n`` (``m`` points);
- a decaying spectrum ``sigma_k ~ k^-1/2``, like momentum matrices with a few strong directions;
- a log-spaced grid on ``[1e-3, 1]`` with weight 0.25, so the polynomial stays tame for any input.

Run: ``python eval/fit_root_coefficients.py`` (about a minute on 2 CPU cores); paste its output
into ``ROOT_COEFFICIENTS`` in ``orthoft/optim/newton_schulz.py``.
"""

from __future__ import annotations

import math

import torch

from orthoft.optim.newton_schulz import KELLER_COEFFICIENTS, ROOT_ASPECT_EDGES, ROOT_MIN_DIM_EDGES

STEPS = 5


def marchenko_pastur_quantiles(rows: int, cols: int, grid: int = 200_000) -> torch.Tensor:
    """``rows`` quantiles of the Marchenko-Pastur eigenvalue law for a Gaussian ``rows x cols``."""
    ratio = rows / cols
    low, high = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    # Integrate in t = sqrt(x): the density has a 1/sqrt(x) edge at 0 when the matrix is square.
    t = torch.linspace(math.sqrt(low), math.sqrt(high), grid, dtype=torch.float64)
    x = t**2
    density = torch.sqrt(((high - x) * (x - low)).clamp_min(0)) / (2 * math.pi * ratio * x.clamp_min(1e-300))
    weights = density * 2 * t
    cdf = torch.cumsum(weights, 0)
    cdf = cdf / cdf[-1]
    targets = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    return x[torch.searchsorted(cdf, targets).clamp_max(grid - 1)]


def normalized_spectra(rows: int, cols: int) -> list[tuple[torch.Tensor, float]]:
    """(singular values of X/|X|_F, weight) for the spectra the fit targets."""
    eigenvalues = marchenko_pastur_quantiles(rows, cols)
    gaussian = (eigenvalues / eigenvalues.sum()).sqrt()
    decaying = torch.arange(1, rows + 1, dtype=torch.float64) ** -0.5
    decaying = decaying / decaying.norm()
    grid = torch.logspace(-3, 0, 200, dtype=torch.float64)
    return [(gaussian, 1.0), (decaying, 1.0), (grid, 0.25)]


def iterate(sigma: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    a, b, c = coefficients
    for _ in range(STEPS):
        sq = sigma * sigma
        sigma = sigma * (a + sq * (b + c * sq))
    return sigma


# The loss is not convex in (a, b, c): LBFGS from one start lands in different basins for
# neighbouring buckets, so every bucket tries the same few starts and keeps the best.
STARTS = (KELLER_COEFFICIENTS, (3.2, -3.6, 1.36), (3.0, -4.1, 2.0), (1.875, -1.25, 0.375))


def fit_bucket(rows: int, cols: int) -> tuple[tuple[float, float, float], float, float]:
    """Best quintic for the shape, and the loss of the fit and of Keller's coefficients."""
    spectra = normalized_spectra(rows, cols)

    def loss_of(coefficients: torch.Tensor) -> torch.Tensor:
        return sum(w * ((iterate(s, coefficients) - 1) ** 2).mean() for s, w in spectra)

    keller_loss = float(loss_of(torch.tensor(KELLER_COEFFICIENTS, dtype=torch.float64)))
    best, best_loss = KELLER_COEFFICIENTS, keller_loss
    for start in STARTS:
        coefficients = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([coefficients], lr=0.5, max_iter=400, line_search_fn="strong_wolfe")

        def closure(coefficients: torch.Tensor = coefficients, optimizer: torch.optim.LBFGS = optimizer):
            optimizer.zero_grad()
            loss = loss_of(coefficients)
            loss.backward()
            return loss

        optimizer.step(closure)
        rounded = tuple(round(float(v), 4) for v in coefficients.detach())
        loss = float(loss_of(torch.tensor(rounded, dtype=torch.float64)))
        if math.isfinite(loss) and loss < best_loss:
            best, best_loss = rounded, loss
    return best, best_loss, keller_loss


def main() -> None:
    torch.set_num_threads(2)
    print("ROOT_COEFFICIENTS: dict[tuple[int, int], Coefficients] = {")
    for min_edge in ROOT_MIN_DIM_EDGES:
        for aspect_edge in ROOT_ASPECT_EDGES:
            rows, cols = min_edge, min_edge * aspect_edge
            (a, b, c), fitted, keller = fit_bucket(rows, cols)
            comment = f"loss {fitted:.4f} (Keller {keller:.4f})"
            print(f"    ({min_edge}, {aspect_edge}): ({a}, {b}, {c}),  # {comment}")
    print("}")


if __name__ == "__main__":
    main()
