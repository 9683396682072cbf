"""Default learning rates per adapter method and optimizer: what ``optim.lr: auto`` uses.

Measured by ``eval/bench_quality.py`` (MiniLM-L6, Rotten Tomatoes; the table and its settings are
in ``docs/quality.md``): per (method, optimizer), the grid lr with the best test accuracy, one grid
step lower when the next higher lr lost more than 3 points (a cliff: LoRA with AdamW). Entries
marked "derived" in ``LR_SOURCES`` were not grid-measured in that run; how each was derived is
written next to it. For an orthogonalized optimizer the value is the lr of the tensors it
orthogonalizes; what falls back to AdamW (vectors, the classifier head) gets the method's AdamW
value (``resolve_lr``).

Transfer to other models: these are rates for SHORT fine-tunes (about a hundred steps) of a small
encoder. The papers train 7B models for thousands of steps with AdamW at 4e-4 (OFTv2, BOFT, HRA,
qGOFT, PSOFT), 1e-3 (SVFT) and 1e-4 (CLOVER; ``recipes/gpu``), 7-30x below the AdamW values
here. What transfers: the RATIOS between methods (an AdamW step moves each parametrization by a
different amount, see docs/quality.md), and the Muon-family values across width (their steps have
spectral norm 1 whatever the matrix size). What does not: the absolute AdamW value across
training length and depth; scale it down with longer runs as the papers do.
"""

from __future__ import annotations

from typing import Any

OPTIMIZER_KEYS = ("adamw", "muon", "normuon", "turbomuon", "root", "auon", "hybridauon")


def _row(adamw: float, muon: float, root: float, auon: float) -> dict[str, float]:
    # NorMuon and TurboMuon take Muon's steps (same spectral/Frobenius size); HybridAuON is AuON's.
    return {
        "adamw": adamw,
        "muon": muon,
        "normuon": muon,
        "turbomuon": muon,
        "root": root,
        "auon": auon,
        "hybridauon": auon,
    }


RECOMMENDED_LR: dict[str, dict[str, float]] = {
    "oft": _row(adamw=3e-3, muon=1e-2, root=1e-2, auon=3e-2),
    "boft": _row(adamw=3e-3, muon=1e-2, root=3e-2, auon=3e-2),
    "qgoft": _row(adamw=1e-2, muon=3e-2, root=1e-1, auon=1e-1),
    "hra": _row(adamw=1e-2, muon=3e-2, root=3e-2, auon=1e-1),
    "psoft": _row(adamw=3e-3, muon=1e-2, root=1e-2, auon=3e-2),
    "svft": _row(adamw=1e-2, muon=1e-2, root=1e-2, auon=1e-2),  # vectors only: every optimizer is AdamW
    "clover": _row(adamw=3e-3, muon=1e-1, root=1e-1, auon=3e-1),
    "lora": _row(adamw=1e-3, muon=3e-2, root=3e-2, auon=1e-1),
    "orthogonal_adaptation": _row(adamw=1e-3, muon=3e-2, root=3e-2, auon=1e-1),
}
"""lr per method and optimizer (keys as ``optimizer_key`` normalizes them). How each was obtained: ``LR_SOURCES``."""

LR_SOURCES: dict[str, str] = {
    "measured": "grid-measured by eval/bench_quality.py (oft: adamw, muon, auon; hra: adamw; lora: adamw)",
    "adamw": "boft, psoft: OFT's (bounded Cayley blocks, the same plateau family); qgoft: HRA's (unbounded "
    "tensors with a soft penalty, similar one-step sensitivity); svft: 1e-2 (lowest one-step sensitivity; "
    "its 7B rate is 2.5x the others'); clover: 3e-3 (its 7B rate is the lowest: not raised to HRA's); "
    "orthogonal_adaptation: LoRA's (a LoRA with A frozen)",
    "muon": "oft measured; others: OFT's Muon lr times the ratio of OFT's one-step sensitivity to the method's, "
    "rounded to the half-decade grid (docs/quality.md)",
    "normuon/turbomuon": "Muon's (their steps have Muon's size)",
    "root": "Muon's times original / Moonlight update scale for the method's main tensor shape (ROOT uses "
    "Moonlight scaling), rounded to the grid",
    "auon/hybridauon": "oft measured (3x Muon's); others 3x their Muon lr",
}
MEASURED: frozenset[tuple[str, str]] = frozenset(
    {("oft", "adamw"), ("oft", "muon"), ("oft", "auon"), ("hra", "adamw"), ("lora", "adamw")}
)


def method_name(config: Any) -> str:
    """The method a config (or a PEFT model, or a name) is for: ``"oft"``, ..., ``"lora"``."""
    if isinstance(config, str):
        return config.strip().lower()
    peft_config = getattr(config, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:  # a PeftModel: its active adapter's config
        active = getattr(config, "active_adapter", None)
        config = peft_config[active] if active in peft_config else next(iter(peft_config.values()))
    method = getattr(type(config), "method", "") or ""
    if method:
        return method.lower()
    peft_type = str(getattr(config, "peft_type", "") or "")
    return peft_type.rsplit(".", 1)[-1].lower().removeprefix("orthoft_")


def optimizer_key(optimizer: str) -> str:
    return optimizer.lower().replace("-", "").replace("_", "")


def recommended_lr(config: Any, optimizer: str = "adamw") -> float:
    """The default lr of ``config``'s method with ``optimizer`` (what ``optim.lr: auto`` resolves to).

    Args:
        config: an orthoft config (``OFTConfig(...)``), a PEFT ``LoraConfig``, a PEFT model (its
            active adapter's config) or a method name (``"oft"``, ``"hra"``, ``"lora"``, ...).
        optimizer: ``"adamw"`` or an orthoft optimizer name (``"muon"``, ``"normuon"``,
            ``"turbomuon"``, ``"root"``, ``"auon"``, ``"hybridauon"``).

    Raises ValueError naming the known methods or optimizers when there is no entry.
    """
    method, key = method_name(config), optimizer_key(optimizer)
    if method not in RECOMMENDED_LR:
        raise ValueError(
            f"No recommended lr for method {method!r} (from {type(config).__name__}); known: {sorted(RECOMMENDED_LR)}. "
            "Set optim.lr to a number."
        )
    if key not in RECOMMENDED_LR[method]:
        raise ValueError(f"No recommended lr for optimizer {optimizer!r}; known: {list(OPTIMIZER_KEYS)}.")
    return RECOMMENDED_LR[method][key]


def resolve_lr(
    model: Any, optimizer: str, lr: float | str, adamw_lr: float | None = None
) -> tuple[float, float | None]:
    """``(lr, adamw_lr)`` with ``lr="auto"`` resolved for ``model``'s adapter method.

    With ``"auto"`` and no ``adamw_lr``, an orthogonalized optimizer's AdamW fallback (vectors,
    heads) gets the method's AdamW default, as in the measurements. Numbers pass through.
    """
    if lr != "auto":
        return float(lr), adamw_lr
    resolved = recommended_lr(model, optimizer)
    if adamw_lr is None and optimizer_key(optimizer) != "adamw":
        adamw_lr = recommended_lr(model, "adamw")
    return resolved, adamw_lr
