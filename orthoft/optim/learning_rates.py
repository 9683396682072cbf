"""Default learning rates per adapter method and optimizer: what ``optim.lr: auto`` uses.

Measured by ``eval/bench_quality.py`` (MiniLM-L6, Rotten Tomatoes; the table and its settings are
in ``docs/quality.md``): per (method, optimizer), the low end of the best grid lr's one-point plateau
(lrs within one point of the best are ties on this benchmark, and the low end survives deeper and
longer runs, whose upper lr edge moves down), one grid step lower when the best sits at a cliff
(the next higher lr lost more than 3 points). Entries not in ``MEASURED`` were not grid-measured;
``LR_SOURCES`` says how each was derived. For an orthogonalized optimizer the value is the lr of
the tensors it orthogonalizes; what falls back to AdamW (vectors, the classifier head) gets the
method's AdamW value (``resolve_lr``).

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


def _row(
    adamw: float,
    muon: float,
    root: float,
    auon: float,
    normuon: float | None = None,
    turbomuon: float | None = None,
) -> dict[str, float]:
    # NorMuon and TurboMuon default to Muon's lr (their steps have Muon's size); HybridAuON takes AuON's.
    return {
        "adamw": adamw,
        "muon": muon,
        "normuon": muon if normuon is None else normuon,
        "turbomuon": muon if turbomuon is None else turbomuon,
        "root": root,
        "auon": auon,
        "hybridauon": auon,
    }


RECOMMENDED_LR: dict[str, dict[str, float]] = {
    "oft": _row(adamw=0.003, muon=0.01, normuon=0.01, turbomuon=0.01, root=0.01, auon=0.01),
    "boft": _row(adamw=0.003, muon=0.003, normuon=0.003, turbomuon=0.003, root=0.01, auon=0.003),
    "qgoft": _row(adamw=0.01, muon=0.01, normuon=0.01, turbomuon=0.01, root=0.03, auon=0.01),
    "hra": _row(adamw=0.01, muon=0.01, normuon=0.03, turbomuon=0.01, root=0.03, auon=0.01),
    "psoft": _row(adamw=0.01, muon=0.003, normuon=0.003, turbomuon=0.003, root=0.003, auon=0.03),
    # vectors only: every optimizer is AdamW
    "svft": _row(adamw=0.03, muon=0.03, normuon=0.03, turbomuon=0.03, root=0.03, auon=0.03),
    "clover": _row(adamw=0.01, muon=0.03, normuon=0.03, turbomuon=0.1, root=0.1, auon=0.03),
    "lora": _row(adamw=0.001, muon=0.003, normuon=0.003, turbomuon=0.003, root=0.003, auon=0.01),
    # LoRA's (a LoRA with A frozen)
    "orthogonal_adaptation": _row(adamw=0.001, muon=0.003, normuon=0.003, turbomuon=0.003, root=0.003, auon=0.01),
}
"""lr per method and optimizer (keys as ``optimizer_key`` normalizes them). How each was obtained: ``LR_SOURCES``."""

LR_SOURCES: dict[str, str] = {
    "measured": "the pairs in MEASURED: grid-measured by eval/bench_quality.py (5 log-spaced lrs, 2 seeds at the "
    "best), taking the low end of the best lr's one-point plateau (one grid step lower at a cliff)",
    "normuon/turbomuon": "where not measured: Muon's lr (their steps have Muon's size)",
    "root": "where not measured: Muon's times original / Moonlight update scale for the method's main tensor "
    "shape (ROOT uses Moonlight scaling), rounded to the grid",
    "auon": "where not measured: 3x the method's Muon lr; HybridAuON always takes AuON's",
    "svft": "its AdamW lr for every optimizer: it trains vectors only, which orthogonalized optimizers send to AdamW",
    "orthogonal_adaptation": "LoRA's (a LoRA with A frozen); not measured",
}
MEASURED: frozenset[tuple[str, str]] = frozenset(
    {
        ("oft", "adamw"), ("oft", "muon"), ("oft", "normuon"), ("oft", "turbomuon"), ("oft", "root"),
        ("oft", "auon"), ("boft", "adamw"), ("boft", "muon"), ("boft", "normuon"), ("boft", "turbomuon"),
        ("boft", "root"), ("boft", "auon"), ("qgoft", "adamw"), ("qgoft", "muon"), ("qgoft", "normuon"),
        ("qgoft", "turbomuon"), ("qgoft", "root"), ("qgoft", "auon"), ("hra", "adamw"), ("hra", "muon"),
        ("hra", "normuon"), ("hra", "turbomuon"), ("hra", "root"), ("hra", "auon"), ("psoft", "adamw"),
        ("psoft", "muon"), ("psoft", "normuon"), ("psoft", "turbomuon"), ("psoft", "root"), ("psoft", "auon"),
        ("svft", "adamw"), ("clover", "adamw"), ("clover", "muon"), ("clover", "normuon"), ("clover", "turbomuon"),
        ("clover", "root"), ("clover", "auon"), ("lora", "adamw"), ("lora", "muon"), ("lora", "normuon"),
        ("lora", "turbomuon"), ("lora", "root"), ("lora", "auon")
    }
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
