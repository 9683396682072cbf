"""Orthogonalized optimizers that see adapter tensors through matrix views.

One base class does the shared work of every variant, per parameter:

1. momentum ``m <- beta m + (1 - beta) g`` (Nesterov: use ``g + beta (m - g)``, as Keller's muon.py);
2. see the update through the parameter's view as a ``(B, m, n)`` stack (see ``views.py``);
3. ``direction()``: the one method a variant overrides (orthogonalize, normalize rows, ...);
4. scale by the update rule and apply with decoupled weight decay ``p <- p (1 - lr wd)``.

Parameters whose view is ``"vector"`` (or whose group has ``use_muon=False``) get AdamW instead,
with the group's ``lr`` and ``weight_decay``: put them in their own group for their own lr
(``orthoft.optim.build_optimizer`` does).

Param group keys (plain data, so ``state_dict`` round-trips): ``view`` (``"auto"`` picks
``matrix`` for 2-D, ``matrix_stack`` for >2-D and ``vector`` for the rest), ``use_muon``,
``update_scale`` (``"original"``: ``sqrt(max(1, rows/cols))``; ``"match_rms_adamw"``:
``0.2 sqrt(max(rows, cols))`` as Moonlight; ``"none"``), ``ns_method``, ``ns_steps``,
``ns_dtype`` (a dtype name; ``None`` is bf16 on CUDA and float32 elsewhere).

Distributed: under DDP every rank holds the same averaged gradient and the step is deterministic,
so parameters stay identical. Sharded parameters (FSDP2 DTensor, FSDP1 flat parameters) are
rejected with an error: orthogonalizing a shard is not orthogonalizing the matrix, and this
package does not gather shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from .newton_schulz import METHODS, default_ns_dtype, orthogonalize
from .views import VECTOR, VIEW_NAMES, check_view, get_view

UPDATE_SCALES = ("original", "match_rms_adamw", "none")
AUTO_VIEW = "auto"


def update_scale_factor(rule: str, rows: int, cols: int) -> float:
    """How much to scale an orthogonalized ``rows x cols`` update (``rule`` in UPDATE_SCALES)."""
    if rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        # Moonlight: an orthogonal update has RMS ~ 1/sqrt(max dim); this gives RMS 0.2 like AdamW.
        return 0.2 * math.sqrt(max(rows, cols))
    if rule == "none":
        return 1.0
    raise ValueError(f"Unknown update_scale {rule!r}; use one of {UPDATE_SCALES}.")


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


def _sharding_problem(p: torch.Tensor) -> str | None:
    if getattr(p, "_fsdp_flattened", False) or type(p).__name__ == "FlatParameter":
        return "an FSDP1 flat (sharded) parameter"
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    if isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor):
        return "a DTensor (FSDP2 / tensor-parallel shard)"
    return None


class OrthogonalizedOptimizer(torch.optim.Optimizer):
    """Shared step for Muon-style optimizers; subclasses override ``direction`` only.

    Args:
        params: parameters or param groups (group keys described in the module docstring).
        lr: learning rate; also the AdamW fallback's, unless a group sets its own.
        momentum: EMA factor of the momentum buffer.
        nesterov: use the Nesterov look-ahead ``g + momentum (m - g)``.
        weight_decay: decoupled: ``p <- p (1 - lr weight_decay)`` before the update.
        update_scale: "original", "match_rms_adamw" or "none".
        ns_method / ns_steps / ns_dtype: the orthogonalization (see ``newton_schulz.orthogonalize``).
        eps: added to norms so zero updates stay zero.
        adamw_betas / adamw_eps: the AdamW fallback's.
    """

    variant_defaults: ClassVar[dict[str, Any]] = {
        "lr": 0.02,
        "update_scale": "original",
        "ns_method": "keller",
        "ns_steps": None,
        "ns_dtype": None,
    }

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        update_scale: str | None = None,
        ns_method: str | None = None,
        ns_steps: int | None = None,
        ns_dtype: torch.dtype | str | None = None,
        eps: float = 1e-7,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        **variant_hyperparameters: Any,
    ) -> None:
        # Base defaults, then the variant's, then whatever the caller set explicitly.
        chosen = {"lr": lr, "update_scale": update_scale, "ns_method": ns_method, "ns_steps": ns_steps,
                  "ns_dtype": _dtype_name(ns_dtype)}
        defaults = {**OrthogonalizedOptimizer.variant_defaults, **self.variant_defaults}
        defaults.update({key: value for key, value in chosen.items() if value is not None})
        defaults.update(
            momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eps=eps,
            adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, view=AUTO_VIEW, use_muon=True,
            **variant_hyperparameters,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["ns_dtype"] = _dtype_name(group["ns_dtype"])
        self._validate_group(group)

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        checks = [
            (group["lr"] >= 0, f"lr must be >= 0, got {group['lr']}"),
            (0 <= group["momentum"] < 1, f"momentum must be in [0, 1), got {group['momentum']}"),
            (group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']}"),
            (group["update_scale"] in UPDATE_SCALES,
             f"update_scale must be one of {UPDATE_SCALES}, got {group['update_scale']!r}"),
            (group["ns_method"] in METHODS,
             f"ns_method must be one of {METHODS}, got {group['ns_method']!r}"),
            (group["view"] in (AUTO_VIEW, *VIEW_NAMES),
             f"view must be one of {(AUTO_VIEW, *VIEW_NAMES)}, got {group['view']!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for p in group["params"]:
            if group["use_muon"] and group["view"] != AUTO_VIEW:
                check_view(group["view"], p, label=f"parameter of shape {tuple(p.shape)}")
            problem = _sharding_problem(p)
            if problem is not None:
                raise NotImplementedError(
                    f"Parameter of shape {tuple(p.shape)} is {problem}. Orthogonalizing a shard is not "
                    "orthogonalizing the matrix and orthoft.optim does not gather shards: train with DDP "
                    "(or a single process), or use torch.optim.AdamW under FSDP."
                )

    @staticmethod
    def view_of(group: dict[str, Any], p: torch.Tensor) -> str:
        """The view a parameter is updated through: AdamW ("vector") or a matrix view."""
        if not group["use_muon"]:
            return VECTOR
        if group["view"] != AUTO_VIEW:
            return group["view"]
        return {0: VECTOR, 1: VECTOR, 2: "matrix"}.get(p.ndim, "matrix_stack")

    def orthogonalize(self, matrices: torch.Tensor, group: dict[str, Any], **overrides: Any) -> torch.Tensor:
        """The group's Newton-Schulz on a ``(B, m, n)`` stack."""
        options = {"method": group["ns_method"], "steps": group["ns_steps"], "eps": group["eps"]}
        options.update(overrides)
        dtype_name = options.pop("dtype", group["ns_dtype"])
        dtype = default_ns_dtype(matrices.device) if dtype_name is None else getattr(torch, dtype_name)
        return orthogonalize(matrices, dtype=dtype, **options)

    def direction(
        self, matrices: torch.Tensor, state: dict[str, Any], group: dict[str, Any], view: str
    ) -> torch.Tensor:
        """The update direction for a ``(B, m, n)`` stack of momentum matrices (Muon: orthogonalize)."""
        return self.orthogonalize(matrices, group, skew=view == "skew_packed")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"Sparse gradients are not supported (parameter {tuple(p.shape)}).")
                view = self.view_of(group, p)
                if view == VECTOR:
                    self._adamw_update(p, group)
                else:
                    self._orthogonalized_update(p, group, view)
        return loss

    def _orthogonalized_update(self, p: torch.Tensor, group: dict[str, Any], view: str) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buffer = state["momentum_buffer"]
        buffer.lerp_(p.grad, 1 - group["momentum"])
        update = p.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
        matrix_view = get_view(view)
        matrices = matrix_view.to_matrices(update)
        if matrices.numel() == 0:
            return
        direction = self.direction(matrices, state, group, view)
        rows, cols = matrices.shape[-2:]
        scale = update_scale_factor(group["update_scale"], rows, cols)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(matrix_view.from_matrices(direction, p).to(p.dtype), alpha=-group["lr"] * scale)

    def _adamw_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["adamw_betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        denominator = (state["exp_avg_sq"] / bias_correction2).sqrt_().add_(group["adamw_eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / bias_correction1)


class Muon(OrthogonalizedOptimizer):
    """Muon (Keller Jordan): Nesterov momentum, 5 quintic Newton-Schulz steps, ``sqrt(max(1, r/c))``."""


class TurboMuon(OrthogonalizedOptimizer):
    """Turbo-Muon: AOL preconditioning replaces the Frobenius normalization, so 4 steps suffice."""

    variant_defaults: ClassVar[dict[str, Any]] = {"ns_method": "turbo", "ns_steps": 4}


class NorMuon(OrthogonalizedOptimizer):
    """NorMuon: after Newton-Schulz, divide each row by the root of a per-row EMA of mean(O^2).

    The result is rescaled to keep the Frobenius norm of the orthogonalized update, so the lr
    means the same as Muon's. On skew-symmetric views the rows and columns are scaled together
    (``O_ij / sqrt(d_i d_j)``), which keeps the update skew, as the packed parameter requires.
    """

    def __init__(self, params: Iterable[Any], beta2: float = 0.95, normuon_eps: float = 1e-8, **kwargs: Any):
        super().__init__(params, beta2=beta2, normuon_eps=normuon_eps, **kwargs)

    def direction(
        self, matrices: torch.Tensor, state: dict[str, Any], group: dict[str, Any], view: str
    ) -> torch.Tensor:
        orthogonal = self.orthogonalize(matrices, group, skew=view == "skew_packed").float()
        if "row_second_moment" not in state:
            state["row_second_moment"] = orthogonal.new_zeros(orthogonal.shape[:-1])
        row_second_moment = state["row_second_moment"]
        row_second_moment.lerp_(orthogonal.square().mean(dim=-1), 1 - group["beta2"])
        row_scale = row_second_moment.sqrt().add_(group["normuon_eps"])
        if view == "skew_packed":
            normalized = orthogonal / (row_scale.unsqueeze(-1) * row_scale.unsqueeze(-2)).sqrt()
        else:
            normalized = orthogonal / row_scale.unsqueeze(-1)
        keep_norm = orthogonal.norm(dim=(-2, -1), keepdim=True) / (
            normalized.norm(dim=(-2, -1), keepdim=True) + group["eps"]
        )
        return normalized * keep_norm


class ROOT(OrthogonalizedOptimizer):
    """ROOT: clip momentum entries at their per-matrix ``clip_quantile`` of |U|, then shape-fitted NS.

    Clipping is ROOT's proximal step: ``U - soft_threshold(U, tau) = clamp(U, -tau, tau)`` keeps the
    bulk and drops the outlier excess. Newton-Schulz runs in float32 with the coefficients fitted
    per shape bucket (``newton_schulz.ROOT_COEFFICIENTS``); updates use Moonlight scaling.
    """

    variant_defaults: ClassVar[dict[str, Any]] = {
        "lr": 1e-3, "ns_method": "root", "ns_dtype": "float32", "update_scale": "match_rms_adamw",
    }

    def __init__(self, params: Iterable[Any], clip_quantile: float = 0.9, **kwargs: Any):
        if not 0 < clip_quantile <= 1:
            raise ValueError(f"clip_quantile must be in (0, 1], got {clip_quantile}")
        super().__init__(params, clip_quantile=clip_quantile, **kwargs)

    def direction(
        self, matrices: torch.Tensor, state: dict[str, Any], group: dict[str, Any], view: str
    ) -> torch.Tensor:
        magnitudes = matrices.abs().flatten(1)
        k = max(1, math.ceil(group["clip_quantile"] * magnitudes.shape[1]))
        threshold = magnitudes.kthvalue(k, dim=1).values.view(-1, 1, 1)
        clipped = torch.maximum(torch.minimum(matrices, threshold), -threshold)
        return self.orthogonalize(clipped, group, skew=view == "skew_packed")


def cosh_brake(matrices: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """AuON's normalization: ``X / sqrt(mean(cosh(gamma X)^2))`` with ``X`` the unit-Frobenius matrix,
    rescaled by ``sqrt(min(m, n))`` to the Frobenius norm of a semi-orthogonal matrix."""
    unit = matrices / (matrices.norm(dim=(-2, -1), keepdim=True) + eps)
    brake = torch.cosh(gamma * unit).square().mean(dim=(-2, -1), keepdim=True).sqrt()
    return unit / brake * math.sqrt(min(matrices.shape[-2:]))


def spectral_norm_estimate(
    matrices: torch.Tensor, start: torch.Tensor | None = None, iterations: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest singular value of each ``(m, n)`` matrix of a ``(B, m, n)`` stack, by power iteration.

    ``2 * iterations`` matrix-vector products per matrix: linear time, as AuON means to be. Returns
    ``(sigma (B, 1, 1), v (B, n))``; pass ``v`` back as ``start`` on the next call (a warm start: the
    momentum changes little between steps, so a few iterations stay tight). Power iteration
    approaches ``sigma_1`` from below.
    """
    v = matrices.abs().sum(dim=-2) if start is None else start  # |A|'s column sums overlap the top vector
    v = v + 1e-6 * v.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # never exactly orthogonal to it
    for _ in range(iterations):
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        v = (matrices.transpose(-2, -1) @ (matrices @ v.unsqueeze(-1))).squeeze(-1)  # A^T A v
    # |A^T A v|^(1/2) >= |A v| for a unit v: the tighter of the two lower bounds on sigma_1
    sigma = v.norm(dim=-1).sqrt()
    return sigma.view(-1, 1, 1), v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


class AuON(OrthogonalizedOptimizer):
    """AuON: linear time, no Newton-Schulz: the momentum through the cosh brake, inside Muon's trust region.

    ``D = cosh_brake(M)`` (unit-Frobenius momentum, braked, times ``sqrt(min(m, n))``: a
    semi-orthogonal matrix's Frobenius norm), then the trust-region bound ``D / max(1, |D|_2)``
    with ``|D|_2`` from ``power_iterations`` warm-started power iterations (state
    ``power_vector``): linear time. Without the bound, a rank-``r`` momentum gives a step of
    spectral norm up to ``sqrt(min(m, n) / r)`` where Muon's is 1 (a rank-2 32x32 skew block: 4x),
    which collapsed OFT. With it the step is never larger than Muon's in spectral norm (1) nor in
    Frobenius norm (``sqrt(stable rank) <= sqrt(rank)``), so Muon's lr and update scaling apply;
    on a rank-1 momentum it is the exact polar factor Muon approximates. Since ``|D|_2 >= 1``
    whenever the brake is near 1 (small entries, the usual case), the bound usually makes the step
    ``M / |M|_2``: normalized momentum, scaled to Muon's spectral step.
    """

    def __init__(self, params: Iterable[Any], gamma: float = 1.5, power_iterations: int = 3,
                 norm_scaling: str = "tensor", rms_beta: float = 0.99, **kwargs: Any):
        if power_iterations < 1:
            raise ValueError(f"power_iterations must be >= 1, got {power_iterations}")
        super().__init__(params, gamma=gamma, power_iterations=power_iterations, norm_scaling=norm_scaling,
                         rms_beta=rms_beta, **kwargs)

    def magnitude(self, matrices: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        norms = matrices.float().norm(dim=(-2, -1), keepdim=True)
        mode = group["norm_scaling"]
        if mode == "none":
            return torch.ones_like(norms)
        current = norms.square() if mode == "block" else norms.square().mean()
        if "momentum_sq" not in state:
            state["momentum_sq"] = torch.zeros_like(current)
            state["rms_step"] = 0
        state["rms_step"] += 1
        state["momentum_sq"].lerp_(current, 1 - group["rms_beta"])
        rms = (state["momentum_sq"] / (1 - group["rms_beta"] ** state["rms_step"])).sqrt()
        return (norms / (rms + group["eps"])).clamp_max(1.0)

    def trust_region(self, direction: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """``direction / max(1, |direction|_2)``, the spectral norm estimated by warm-started power iteration."""
        start = state.get("power_vector")
        if start is not None and start.shape != (direction.shape[0], direction.shape[-1]):
            start = None
        sigma, state["power_vector"] = spectral_norm_estimate(direction, start, group["power_iterations"])
        return direction / sigma.clamp_min(1.0)

    def direction(
        self, matrices: torch.Tensor, state: dict[str, Any], group: dict[str, Any], view: str
    ) -> torch.Tensor:
        scale = self.magnitude(matrices, state, group)
        return scale * self.trust_region(cosh_brake(matrices.float(), group["gamma"], group["eps"]), state, group)


class HybridAuON(AuON):
    """Hybrid AuON: ``ns_steps`` (default 1) quintic Newton-Schulz steps, then AuON's cosh brake and trust region."""

    variant_defaults: ClassVar[dict[str, Any]] = {"ns_steps": 1}

    def direction(
        self, matrices: torch.Tensor, state: dict[str, Any], group: dict[str, Any], view: str
    ) -> torch.Tensor:
        orthogonal = self.orthogonalize(matrices, group, skew=view == "skew_packed")
        return self.trust_region(cosh_brake(orthogonal.float(), group["gamma"], group["eps"]), state, group)


OPTIMIZERS: dict[str, type[OrthogonalizedOptimizer]] = {
    "muon": Muon,
    "normuon": NorMuon,
    "turbomuon": TurboMuon,
    "root": ROOT,
    "auon": AuON,
    "hybridauon": HybridAuON,
}
