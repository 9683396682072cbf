"""Default learning rates (``orthoft.recommended_lr``) and ``optim.lr: auto``."""

from __future__ import annotations

import types

import peft
import pytest

import orthoft
from orthoft.adapters.registry import registered_methods
from orthoft.io.schema import RecipeError, build_section
from orthoft.optim import RECOMMENDED_LR, recommended_lr, resolve_lr
from orthoft.optim.learning_rates import OPTIMIZER_KEYS
from orthoft.training.recipe import OptimSection


def test_every_registered_method_and_lora_has_every_optimizer() -> None:
    for method in [*registered_methods(), "lora"]:
        assert set(RECOMMENDED_LR[method]) == set(OPTIMIZER_KEYS), method
        assert all(0 < lr < 1 for lr in RECOMMENDED_LR[method].values()), method


def test_config_name_and_peft_model_give_the_same_lr() -> None:
    config = orthoft.HRAConfig(target_modules=["q"], r=8)
    expected = RECOMMENDED_LR["hra"]["muon"]
    assert recommended_lr(config, "muon") == recommended_lr("HRA", "Muon") == expected
    model = types.SimpleNamespace(peft_config={"default": config}, active_adapter="default")
    assert recommended_lr(model, "muon") == expected
    lora = peft.LoraConfig(r=8, target_modules=["q"])
    assert recommended_lr(lora) == RECOMMENDED_LR["lora"]["adamw"]
    assert orthoft.recommended_lr is recommended_lr


def test_unknown_method_or_optimizer_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="known:.*oft"):
        recommended_lr("dora", "adamw")
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        recommended_lr("oft", "sgd")


def test_auto_resolves_lr_and_the_adamw_fallback() -> None:
    config = orthoft.OFTConfig(target_modules=["q"], block_size=4)
    lr, adamw_lr = resolve_lr(config, "muon", "auto")
    assert (lr, adamw_lr) == (RECOMMENDED_LR["oft"]["muon"], RECOMMENDED_LR["oft"]["adamw"])
    assert resolve_lr(config, "muon", "auto", adamw_lr=5e-4) == (RECOMMENDED_LR["oft"]["muon"], 5e-4)
    assert resolve_lr(config, "adamw", "auto") == (RECOMMENDED_LR["oft"]["adamw"], None)
    assert resolve_lr(config, "muon", 0.05, None) == (0.05, None)


def test_recipe_accepts_lr_auto_and_rejects_other_words() -> None:
    section = build_section(OptimSection, {"name": "muon", "lr": "auto"}, "optim")
    assert section.lr == "auto"
    assert build_section(OptimSection, {"lr": "1e-3"}, "optim").lr == 1e-3
    with pytest.raises(RecipeError, match="optim.lr"):
        build_section(OptimSection, {"lr": "fast"}, "optim")
    with pytest.raises(RecipeError, match="optim.lr"):
        build_section(OptimSection, {"lr": -1.0}, "optim")


def test_recipe_optimizer_with_lr_auto_uses_the_methods_defaults() -> None:
    from helpers import TinyMLP

    from orthoft.training.loop import build_recipe_optimizer

    model = peft.get_peft_model(TinyMLP(), orthoft.HRAConfig(target_modules=["lin0"], r=2, modules_to_save=["lin1"]))
    optimizer = build_recipe_optimizer(model, OptimSection(name="muon", lr="auto"))
    by_view = {group["view"]: group["lr"] for group in optimizer.param_groups}
    assert by_view == {"matrix": RECOMMENDED_LR["hra"]["muon"], "vector": RECOMMENDED_LR["hra"]["adamw"]}
    adamw = build_recipe_optimizer(model, OptimSection(name="adamw", lr="auto"))
    assert [group["lr"] for group in adamw.param_groups] == [RECOMMENDED_LR["hra"]["adamw"]]


def test_config_docstrings_state_the_table() -> None:
    for method, config_cls in registered_methods().items():
        if method == "orthogonal_adaptation":
            continue  # a diffusion concept adapter; LoRA's rates
        doc = " ".join(config_cls.__doc__.split())  # the paragraph wraps
        assert f"AdamW {RECOMMENDED_LR[method]['adamw']:g}" in doc, method
        if method != "svft":  # vectors only: AdamW for every optimizer
            for key, label in [("muon", "Muon"), ("normuon", "NorMuon"), ("turbomuon", "TurboMuon")]:
                assert f" {label} {RECOMMENDED_LR[method][key]:g}," in doc, (method, key)
            assert f"ROOT {RECOMMENDED_LR[method]['root']:g}" in doc, method
            assert f"AuON {RECOMMENDED_LR[method]['auon']:g}" in doc, method
