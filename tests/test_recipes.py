"""Recipe files and their validation: every shipped recipe loads; bad keys and values give clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orthoft.adapters.registry import registered_methods
from orthoft.io.schema import RecipeError, canonical_method
from orthoft.training.recipe import load_recipe, recipe_from_dict
from tests.tiny_recipes import CAUSAL

ALL_RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))
# diffusion-*.yaml belong to `orthoft diffusion` and its own schema (orthoft/diffusion/recipe.py)
RECIPES = [p for p in ALL_RECIPES if not p.name.startswith("diffusion-")]
METHODS = ("oft", "boft", "qgoft", "hra", "psoft", "svft", "clover")
OPTIMIZERS = ("adamw", "muon", "normuon", "turbomuon", "root", "auon")


def _method_of(path: Path) -> str:
    return canonical_method(yaml.safe_load(path.read_text())["adapter"]["method"])


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(p.parents[1])) for p in RECIPES])
def test_shipped_recipe_validates(path):
    method = _method_of(path)
    if method not in registered_methods():
        pytest.skip(f"method {method!r} has no registered config class in orthoft.adapters yet")
    recipe = load_recipe(path)
    assert recipe.adapter.method == method
    # what a run saves next to its outputs loads back to the same recipe
    assert recipe_from_dict(recipe.to_dict(), source=str(path)).to_dict() == recipe.to_dict()


def test_diffusion_recipe_given_to_train_points_to_its_command(tmp_path):
    raw = {"output_dir": "runs/x", "base": {"seed": 0}, "subject": {"digit": 9}, "adapter": {"method": "oft"}}
    message = _error(raw)
    assert "unknown key 'output_dir'" in message and "orthoft diffusion train my.yaml" in message


def test_the_expected_recipes_ship():
    names = {p.name for p in RECIPES}
    assert "smollm2-qoft.yaml" in names
    for method in METHODS:
        assert f"minilm-sentiment-{method}.yaml" in names
        assert any(n.startswith("qwen2.5-7b") and n.endswith(f"-{'qoft' if method == 'oft' else method}.yaml")
                   for n in names), method
    for optimizer in OPTIMIZERS:
        assert f"minilm-sentiment-optim-{optimizer}.yaml" in names


def test_default_recipe_is_the_cpu_demo():
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "smollm2-qoft.yaml")
    assert recipe.model.name_or_path == "smollm2" and recipe.model.load_in_4bit
    assert recipe.model.bnb_4bit_quant_type == "nf4" and recipe.adapter.method == "oft"
    assert recipe.adapter.options["target_modules"] == "all-linear"
    assert recipe.data.source == "hamlet" and recipe.export.enabled


def _error(raw: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, source="my.yaml", overrides=overrides)
    return str(info.value)


def _with(section: str, **values) -> dict:
    raw = {name: dict(value) if isinstance(value, dict) else value for name, value in CAUSAL.items()}
    raw[section] = {**raw.get(section, {}), **values}
    return raw


def test_unknown_keys_name_the_key_and_the_valid_ones():
    message = _error(_with("train", max_step=10))
    assert "my.yaml" in message and "'max_step'" in message and "'max_steps'" in message and "train" in message
    message = _error({**CAUSAL, "trian": {}})
    assert "'trian'" in message and "'train'" in message
    message = _error(_with("adapter", block_sise=8))
    assert "'block_sise'" in message and "'block_size'" in message and "OFTConfig" in message
    message = _error(_with("adapter", peft_type="LORA"))  # set by orthoft, not by recipes
    assert "'peft_type'" in message


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("train", {"max_steps": "ten"}, "train.max_steps: expected int, got 'ten'"),
        ("train", {"max_steps": True}, "train.max_steps: expected int"),
        ("train", {"batch_size": 0}, "train.batch_size: must be > 0, got 0"),
        ("train", {"lr_scheduler": "cosin"}, "train.lr_scheduler: expected one of 'constant'"),
        ("train", {"warmup_steps": 8}, "train.warmup_steps"),
        ("model", {"task": "regression"}, "model.task: expected one of 'causal_lm', 'sequence_classification'"),
        ("model", {"load_in_4bit": "yes"}, "model.load_in_4bit: expected bool"),
        ("data", {"held_out_fraction": 1.5}, "data.held_out_fraction: must be in (0, 1)"),
        ("data", {"source": "wikipedia"}, "data.source: expected one of 'hamlet'"),
        ("optim", {"name": "sgd"}, "optim.name: unknown optimizer 'sgd'; valid: ["),
        ("optim", {"lr": -1.0}, "optim.lr: must be > 0"),
        ("eval", {"metrics": ["bleu"]}, "eval.metrics: unknown metric 'bleu'"),
        ("eval", {"metrics": ["accuracy"]}, "accuracy/f1 need model.task sequence_classification"),
        ("adapter", {"method": "lora"}, "no orthoft method 'lora' is registered"),
        ("adapter", {"block_size": -4}, "OFTConfig: block_size must be > 0, got -4"),
        ("adapter", {"block_size": 8, "num_blocks": 4}, "set block_size or num_blocks, not both"),
        ("adapter", {"block_size": "big"}, "adapter.block_size: expected int or null, got 'big'"),
    ],
)
def test_bad_values_say_where_and_what(section, values, expected):
    message = _error(_with(section, **values))
    assert expected in message, message
    assert message.startswith("my.yaml")


def test_missing_section_and_required_key():
    raw = {k: v for k, v in CAUSAL.items() if k != "data"}
    assert "missing section 'data'" in _error(raw)
    assert "missing required key 'name_or_path'" in _error({**CAUSAL, "model": {"task": "causal_lm"}})


def test_overrides_are_yaml_values_and_validated():
    recipe = recipe_from_dict(
        CAUSAL,
        overrides=[
            "train.max_steps=3",
            "optim.lr=1e-3",
            "adapter.target_modules=[q_proj, v_proj]",
            "eval.eval_before=false",
        ],
    )
    assert recipe.train.max_steps == 3 and recipe.optim.lr == 1e-3  # "1e-3" is a str to YAML 1.1: accepted as float
    assert recipe.adapter.options["target_modules"] == ["q_proj", "v_proj"] and recipe.eval.eval_before is False
    assert "expected SECTION.KEY=VALUE" in _error(CAUSAL, ["max_steps=3"])
    assert "unknown section 'trian'" in _error(CAUSAL, ["trian.max_steps=3"])
    assert "'max_step'" in _error(CAUSAL, ["train.max_step=3"])


def test_method_aliases_and_registry_lookup():
    recipe = recipe_from_dict(_with("adapter", method="QOFT"))
    assert recipe.adapter.method == "oft" and recipe.adapter.peft_type == "ORTHOFT_OFT"
    assert set(registered_methods()) >= {"oft", "boft"}


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)


def test_cli_check_validates_without_training(tmp_path, capsys):
    from orthoft.cli import main

    path = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-qoft.yaml"
    assert main(["train", str(path), "--check"]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("train", max_step=1)))
    assert main(["train", str(bad), "--check"]) == 2  # a user error: one line on stderr
    assert "orthoft train: " in (err := capsys.readouterr().err) and "unknown key 'max_step'" in err
