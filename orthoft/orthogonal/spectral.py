"""Singular factors of frozen weights, shared by the SVD-based adapters (PSOFT, SVFT).

All factorizations run in float32 (or better) whatever the model dtype; callers cast where the
factors meet activations.
"""

from __future__ import annotations

from typing import Literal

import torch

SVDMethod = Literal["full", "lowrank"]


def principal_factors(
    weight: torch.Tensor,
    rank: int,
    method: SVDMethod = "full",
    niter: int = 10,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``weight`` (out, in): ``U_r`` (out, r), ``S_r``, ``V_r`` (in, r).

    ``"full"`` is ``torch.linalg.svd``; ``"lowrank"`` is ``torch.svd_lowrank(q=rank, niter=niter)`` under a
    forked RNG seeded with ``seed``, so the result is reproducible and the global RNG is left untouched
    (the same call PEFT's PSOFT makes, so both get the same factors).
    """
    weight = weight.float()
    if method == "full":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].T.contiguous()
    if method == "lowrank":
        devices = [] if weight.device.type == "cpu" else [weight.device]
        kwargs = {"devices": devices} if not devices else {"devices": devices, "device_type": weight.device.type}
        with torch.random.fork_rng(**kwargs):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(weight, q=rank, niter=niter)
        return u[:, :rank].contiguous(), s[:rank].contiguous(), v[:, :rank].contiguous()
    raise ValueError(f"principal_factors: unknown SVD method {method!r}. Fix: use 'full' or 'lowrank'.")


def canonical_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular pairs so that each column of ``v`` has its largest-magnitude entry positive.

    A singular pair ``(u_i, v_i)`` is only defined up to a common sign; fixing it makes a
    recomputed factorization reproduce the stored one whenever the singular values are distinct.
    """
    pivot = v.abs().argmax(dim=0)
    signs = torch.sign(v.gather(0, pivot[None, :])).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, v * signs


__all__ = ["SVDMethod", "canonical_signs", "principal_factors"]
