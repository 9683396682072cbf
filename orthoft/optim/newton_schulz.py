"""Newton-Schulz style orthogonalization of stacks of matrices.

Every function takes a tensor shaped ``(..., m, n)`` and treats the leading dims as a batch of
independent matrices. An odd polynomial ``p(x) = a x + b x^3 + c x^5`` applied to a matrix acts
on each singular value separately, so iterating it pushes all singular values toward 1 while
keeping the singular vectors: the result approximates ``U V^T`` of ``G = U S V^T``.

Methods (``orthogonalize(..., method=...)``):

- ``"keller"``: Keller Jordan's quintic ``(3.4445, -4.7750, 2.0315)``, 5 steps on ``X/|X|_F``.
  It trades exactness for speed: singular values land in roughly ``[0.7, 1.2]``, not at 1.
- ``"polar_express"``: per-step minimax-optimal coefficients (Amsel et al. 2025, arXiv 2505.16932,
  Algorithm 1), with a safety factor on the normalization and on every polynomial but the last.
- ``"turbo"``: AOL row scaling (Turbo-Muon, Boissin et al. 2025, arXiv 2512.04632) instead of the
  Frobenius normalization, reusing ``X X^T`` for the first step, then 4 Polar Express steps with
  the first (aggressive) polynomial dropped, because AOL already starts closer to orthogonal.
- ``"root"``: one quintic per matrix-shape bucket (ROOT, He et al. 2025, arXiv 2511.20626). ROOT
  only publishes coefficients for four 2048-row LLM shapes; the table below was fitted here by
  ``eval/fit_root_coefficients.py`` for the small shapes adapters have.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Coefficients = tuple[float, float, float]

KELLER_COEFFICIENTS: Coefficients = (3.4445, -4.7750, 2.0315)

# Polar Express degree-5 polynomials as published (arXiv 2505.16932, Algorithm 1). After the
# last entry the polynomial is numerically constant, so longer schedules repeat it.
POLAR_EXPRESS_COEFFICIENTS: tuple[Coefficients, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# The paper's bf16 margin: normalize by 1.01 |X|_F and evaluate each polynomial at x / 1.01,
# so rounding that pushes a singular value slightly above the fitted interval cannot blow up.
POLAR_EXPRESS_SAFETY = 1.01

# ROOT-style quintics fitted per shape bucket by eval/fit_root_coefficients.py (5 steps on
# X/|X|_F, least squares of the final singular values to 1 over Gaussian and decaying spectra).
# Key: (upper edge of min(m, n), upper edge of max(m, n) / min(m, n)).
ROOT_MIN_DIM_EDGES: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
ROOT_ASPECT_EDGES: tuple[int, ...] = (1, 2, 4, 8, 16)
ROOT_COEFFICIENTS: dict[tuple[int, int], Coefficients] = {
    (8, 1): (3.2468, -3.6425, 1.3864),  # loss 0.0105 (Keller 0.0989)
    (8, 2): (3.2502, -3.6565, 1.3944),  # loss 0.0103 (Keller 0.0968)
    (8, 4): (3.2508, -3.654, 1.3924),  # loss 0.0104 (Keller 0.0941)
    (8, 8): (3.2527, -3.6603, 1.3958),  # loss 0.0104 (Keller 0.0830)
    (8, 16): (3.2546, -3.6487, 1.3855),  # loss 0.0103 (Keller 0.0723)
    (16, 1): (3.213, -3.5741, 1.3488),  # loss 0.0111 (Keller 0.0791)
    (16, 2): (3.2373, -3.6399, 1.3922),  # loss 0.0107 (Keller 0.0903)
    (16, 4): (3.2436, -3.6482, 1.3935),  # loss 0.0107 (Keller 0.0877)
    (16, 8): (3.241, -3.6389, 1.3884),  # loss 0.0108 (Keller 0.0976)
    (16, 16): (3.2444, -3.6615, 1.4031),  # loss 0.0107 (Keller 0.1111)
    (32, 1): (3.1815, -3.5737, 1.3718),  # loss 0.0127 (Keller 0.1149)
    (32, 2): (3.2143, -3.6011, 1.3693),  # loss 0.0111 (Keller 0.1214)
    (32, 4): (3.2113, -3.6009, 1.3704),  # loss 0.0111 (Keller 0.1239)
    (32, 8): (3.2336, -3.6379, 1.3938),  # loss 0.0108 (Keller 0.1131)
    (32, 16): (3.2365, -3.659, 1.4078),  # loss 0.0107 (Keller 0.0982)
    (64, 1): (3.2352, -3.6533, 1.3909),  # loss 0.0172 (Keller 0.0862)
    (64, 2): (3.2159, -3.5799, 1.3507),  # loss 0.0114 (Keller 0.0849)
    (64, 4): (3.2159, -3.593, 1.3613),  # loss 0.0113 (Keller 0.0910)
    (64, 8): (3.2163, -3.5853, 1.355),  # loss 0.0112 (Keller 0.1044)
    (64, 16): (3.2174, -3.5614, 1.3359),  # loss 0.0113 (Keller 0.1109)
    (128, 1): (3.228, -3.6853, 1.4232),  # loss 0.0215 (Keller 0.0856)
    (128, 2): (3.2042, -3.5752, 1.3576),  # loss 0.0116 (Keller 0.0860)
    (128, 4): (3.205, -3.578, 1.3588),  # loss 0.0116 (Keller 0.0896)
    (128, 8): (3.2108, -3.6062, 1.3758),  # loss 0.0116 (Keller 0.0879)
    (128, 16): (3.2146, -3.6189, 1.3843),  # loss 0.0116 (Keller 0.0929)
    (256, 1): (3.2266, -3.6755, 1.4167),  # loss 0.0262 (Keller 0.0722)
    (256, 2): (3.2222, -3.6091, 1.3687),  # loss 0.0132 (Keller 0.0595)
    (256, 4): (3.22, -3.5567, 1.3305),  # loss 0.0119 (Keller 0.0529)
    (256, 8): (3.2225, -3.5308, 1.3084),  # loss 0.0119 (Keller 0.0504)
    (256, 16): (3.2218, -3.5105, 1.2931),  # loss 0.0118 (Keller 0.0479)
    (512, 1): (3.1696, -3.5246, 1.3077),  # loss 0.0350 (Keller 0.0917)
    (512, 2): (3.1073, -3.3531, 1.2261),  # loss 0.0158 (Keller 0.0809)
    (512, 4): (3.1134, -3.3983, 1.258),  # loss 0.0155 (Keller 0.0768)
    (512, 8): (3.1286, -3.4654, 1.2992),  # loss 0.0153 (Keller 0.0816)
    (512, 16): (3.1531, -3.5809, 1.3675),  # loss 0.0143 (Keller 0.0853)
    (1024, 1): (3.175, -3.5921, 1.3708),  # loss 0.0430 (Keller 0.0831)
    (1024, 2): (3.1174, -3.4088, 1.268),  # loss 0.0165 (Keller 0.0685)
    (1024, 4): (3.1134, -3.3357, 1.2113),  # loss 0.0162 (Keller 0.0646)
    (1024, 8): (3.1262, -3.2956, 1.1716),  # loss 0.0163 (Keller 0.0542)
    (1024, 16): (3.1496, -3.301, 1.1648),  # loss 0.0159 (Keller 0.0492)
    (2048, 1): (3.2724, -4.0514, 1.6697),  # loss 0.0510 (Keller 0.1178)
    (2048, 2): (3.0303, -4.1556, 2.0666),  # loss 0.0218 (Keller 0.1042)
    (2048, 4): (3.0609, -4.1504, 2.0141),  # loss 0.0215 (Keller 0.1020)
    (2048, 8): (3.105, -4.1292, 1.9227),  # loss 0.0202 (Keller 0.1105)
    (2048, 16): (3.1128, -4.0929, 1.8681),  # loss 0.0194 (Keller 0.1209)
}

METHODS = ("keller", "polar_express", "turbo", "root")
DEFAULT_STEPS = {"keller": 5, "polar_express": 5, "turbo": 4, "root": 5}


def default_ns_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where matmuls are fast in it (CUDA); float32 on CPU, where bf16 matmul is slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def with_safety(coefficients: Coefficients, safety: float) -> Coefficients:
    """Coefficients of ``x -> p(x / safety)``."""
    a, b, c = coefficients
    return (a / safety, b / safety**3, c / safety**5)


def polar_express_schedule(steps: int, safety: float = POLAR_EXPRESS_SAFETY, skip: int = 0) -> list[Coefficients]:
    """The first ``steps`` Polar Express polynomials after skipping ``skip``, with the safety margin.

    The last published polynomial is the fixed point ``(1.875, -1.25, 0.375)`` and is kept exact,
    as in the paper; schedules longer than the table repeat it.
    """
    table = [with_safety(abc, safety) for abc in POLAR_EXPRESS_COEFFICIENTS[:-1]]
    table.append(POLAR_EXPRESS_COEFFICIENTS[-1])
    wanted = range(skip, skip + steps)
    return [table[min(i, len(table) - 1)] for i in wanted]


def _bucket(value: float, edges: Sequence[int]) -> int:
    for edge in edges:
        if value <= edge:
            return edge
    return edges[-1]


def root_coefficients(rows: int, cols: int) -> Coefficients:
    """The fitted ROOT quintic for a ``rows x cols`` matrix (orientation does not matter)."""
    small, large = min(rows, cols), max(rows, cols)
    key = (_bucket(small, ROOT_MIN_DIM_EDGES), _bucket(large / small, ROOT_ASPECT_EDGES))
    return ROOT_COEFFICIENTS.get(key, KELLER_COEFFICIENTS)


def coefficient_schedule(method: str, steps: int, rows: int, cols: int) -> list[Coefficients]:
    """The per-step polynomials ``method`` uses for a ``rows x cols`` matrix."""
    if method == "keller":
        return [KELLER_COEFFICIENTS] * steps
    if method == "polar_express":
        return polar_express_schedule(steps)
    if method == "turbo":
        # AOL lands closer to orthogonal than X/|X|_F, so the first, most aggressive polynomial
        # (made for singular values near 0) is dropped, as the Turbo-Muon authors do.
        return polar_express_schedule(steps, skip=1)
    if method == "root":
        return [root_coefficients(rows, cols)] * steps
    raise ValueError(f"Unknown orthogonalization method {method!r}; use one of {METHODS}.")


def frobenius_normalize(x: torch.Tensor, safety: float = 1.0, eps: float = 1e-7) -> torch.Tensor:
    """``x / (safety |x|_F)`` per matrix: bounds the spectral norm by ``1 / safety``."""
    return x / (x.norm(dim=(-2, -1), keepdim=True) * safety + eps)


def aol_precondition(
    x: torch.Tensor, two_sided: bool = False, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AOL row scaling ``diag(s) x`` with ``s_i = 1/sqrt(sum_j |(x x^T)_ij|)``, and its Gram matrix.

    The scaled matrix has spectral norm <= 1 (Gershgorin on the scaled Gram matrix), and it is
    usually much closer to orthogonal than ``x/|x|_F``. The Gram matrix of the scaled matrix is
    ``diag(s) (x x^T) diag(s)``, so the first Newton-Schulz step gets it for free.

    ``two_sided=True`` is for skew-symmetric ``x``: row scaling alone would make it non-skew, so
    use ``diag(sqrt(s)) x diag(sqrt(s))``, which stays skew and, being normal and similar to
    ``diag(s) x``, still has spectral norm <= 1. Its Gram matrix is not a rescaled ``x x^T``, so
    none is returned.
    """
    gram = x @ x.mT
    # In place where possible: for small stacked blocks these elementwise passes cost as much as a
    # matmul, and they are what eats into the one Newton-Schulz step that AOL saves.
    scale = gram.abs().sum(dim=-1).clamp_min_(eps).rsqrt_()  # (vector_norm ord=1 is 30x slower on CPU)
    if two_sided:
        root = scale.sqrt_()
        return x * root.unsqueeze(-1) * root.unsqueeze(-2), None
    gram.mul_(scale.unsqueeze(-1)).mul_(scale.unsqueeze(-2))
    return x * scale.unsqueeze(-1), gram


def quintic_step(x: torch.Tensor, coefficients: Coefficients, gram: torch.Tensor | None = None) -> torch.Tensor:
    """``a x + b (x x^T) x + c (x x^T)^2 x`` for a ``(batch, m, n)`` stack with m <= n."""
    a, b, c = coefficients
    if gram is None:
        gram = x @ x.mT
    poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
    return torch.baddbmm(x, poly, x, beta=a)


def orthogonalize(
    g: torch.Tensor,
    method: str = "keller",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
    coefficients: Sequence[Coefficients] | None = None,
    eps: float = 1e-7,
    skew: bool = False,
) -> torch.Tensor:
    """Approximate the orthogonal polar factor ``U V^T`` of each matrix in ``g`` (..., m, n).

    Args:
        g: a matrix or a stack of matrices; leading dims are independent matrices.
        method: one of ``METHODS``.
        steps: iterations; defaults to ``DEFAULT_STEPS[method]``.
        dtype: compute dtype; defaults to bf16 on CUDA and float32 elsewhere.
        coefficients: an explicit per-step schedule, overriding the method's one.
        eps: added to the normalizing norm so a zero matrix maps to zero.
        skew: the matrices are skew-symmetric; keep the result skew (matters for "turbo" only:
            odd polynomials keep skew matrices skew, one-sided AOL scaling does not).

    Returns a tensor shaped and typed like ``g``.
    """
    if g.ndim < 2:
        raise ValueError(
            f"orthogonalize needs (..., m, n) matrices, got shape {tuple(g.shape)}; "
            "route vectors to the AdamW fallback instead."
        )
    if method not in METHODS:
        raise ValueError(f"Unknown orthogonalization method {method!r}; use one of {METHODS}.")
    steps = DEFAULT_STEPS[method] if steps is None else steps
    dtype = default_ns_dtype(g.device) if dtype is None else dtype
    rows, cols = g.shape[-2:]
    if g.numel() == 0:
        return g.clone()
    if coefficients is None:
        coefficients = coefficient_schedule(method, steps, rows, cols)

    # Work on the wide orientation: the Gram matrix is then min(m, n) squared, the cheaper side.
    x = g.reshape(-1, rows, cols).to(dtype)
    transposed = rows > cols
    if transposed:
        x = x.mT

    gram = None
    if method == "turbo":
        x, gram = aol_precondition(x, two_sided=skew)
    else:
        safety = POLAR_EXPRESS_SAFETY if method == "polar_express" else 1.0
        x = frobenius_normalize(x, safety=safety, eps=eps)
    for abc in coefficients:
        x = quintic_step(x, abc, gram)
        gram = None

    if transposed:
        x = x.mT
    return x.reshape(g.shape).to(g.dtype)


def max_singular_value_deviation(x: torch.Tensor) -> float:
    """Largest ``|sigma - 1|`` over the singular values of every matrix in ``x`` (float64 SVD).

    How far an orthogonalization result is from an exact polar factor (0 for one). Not
    ``orthoft.orthogonal.orthogonality_error``, which is ``max |R^T R - I|`` over the entries.
    """
    singular_values = torch.linalg.svdvals(x.double())
    return float((singular_values - 1).abs().max())
