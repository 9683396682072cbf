"""Merging several adapters into one (issue 13): every combination type keeps its promise.

``lie`` and ``compose`` stay orthogonal, ``compose`` equals applying the adapters in sequence,
a weight of 1 on one adapter returns it, the merged adapter folded into the base equals the merged
adapter model, it saves, loads and exports, ``fisher``/``projection``/``linear`` do what they say,
refusals name the alternatives, and ``orthoft merge`` writes a loadable folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper

import orthoft
from orthoft.adapters.merging import ortho_layers, supported_combinations, tuner_of
from orthoft.cli import main
from orthoft.orthogonal import cayley_exact, orthogonality_error, packed_size, unpack_skew
from orthoft.orthogonal.lie import (
    blocks_from_polar,
    cayley_from_log,
    cayley_log,
    inverse_cayley,
    polar_coordinates,
    projection_coefficients,
)
from tests.helpers import TinyMLP

TARGETS = ["lin0", "lin1"]
X = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))

CONFIGS = {
    "oft_exact": lambda: orthoft.OFTConfig(target_modules=TARGETS, block_size=8, use_exact_cayley=True),
    "oft_neumann": lambda: orthoft.OFTConfig(target_modules=TARGETS, block_size=8),
    "boft": lambda: orthoft.BOFTConfig(target_modules=TARGETS, block_size=4, n_butterfly_factor=2),
    "boft1_exact": lambda: orthoft.BOFTConfig(
        target_modules=TARGETS, block_size=4, n_butterfly_factor=1, use_exact_cayley=True
    ),
    "goft": lambda: orthoft.QGOFTConfig(target_modules=TARGETS, strict=True),
    "qgoft": lambda: orthoft.QGOFTConfig(target_modules=TARGETS),
    "hra": lambda: orthoft.HRAConfig(target_modules=TARGETS, r=4),
    "psoft": lambda: orthoft.PSOFTConfig(target_modules=TARGETS, r=8, use_exact_cayley=True),
    "svft": lambda: orthoft.SVFTConfig(target_modules=TARGETS),
}


def build(kind: str, names=("a", "b"), scale: float = 0.05, seed: int = 5):
    """TinyMLP with adapters ``names`` of one method, each moved away from the identity differently."""
    torch.manual_seed(0)
    model = get_peft_model(TinyMLP(), CONFIGS[kind](), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, CONFIGS[kind]())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ortho_layers(tuner_of(model)).values():
            for tensor_name in layer.merge_roles:
                for value in getattr(layer, tensor_name).values():
                    value.add_(torch.randn(value.shape, generator=generator) * scale)
    model.eval()
    return model


def outputs(model, adapters) -> torch.Tensor:
    model.base_model.set_adapter(adapters)
    with torch.no_grad():
        return model(X)


def layer_rotations(model, adapter: str) -> list[torch.Tensor]:
    """Each adapted layer's dense input map ``T`` for ``adapter``."""
    maps = []
    for layer in ortho_layers(tuner_of(model)).values():
        eye = torch.eye(layer.in_features)
        with torch.no_grad():
            maps.append(layer.transform_input(adapter, eye))
    return maps


# ---- the math ---------------------------------------------------------------------------------


def test_cayley_log_is_the_rotation_logarithm_and_inverts():
    q = torch.randn(3, packed_size(6), dtype=torch.float64) * 0.7
    log = cayley_log(q)
    rotation = torch.linalg.matrix_exp(unpack_skew(log))
    exact = torch.linalg.solve(torch.eye(6) - unpack_skew(q), torch.eye(6) + unpack_skew(q))
    assert torch.allclose(rotation, exact, atol=1e-12)
    assert torch.allclose(cayley_from_log(log), q, atol=1e-12)
    assert torch.allclose(inverse_cayley(exact), q, atol=1e-10)


def test_half_turns_are_refused():
    half_turn = torch.tensor([[torch.pi * 1.2]], dtype=torch.float64)  # one plane, 1.2 pi
    with pytest.raises(ValueError, match="no Cayley generator"):
        cayley_from_log(half_turn)
    with pytest.raises(ValueError, match="eigenvalue -1"):
        inverse_cayley(-torch.eye(2, dtype=torch.float64))


def test_polar_coordinates_round_trip_and_orthogonal_blocks_have_no_stretch():
    blocks = torch.eye(2) + 0.3 * torch.randn(7, 2, 2, generator=torch.Generator().manual_seed(1))
    coords = polar_coordinates(blocks)
    assert torch.allclose(blocks_from_polar(coords), blocks.double(), atol=1e-12)
    angles = torch.linspace(-1, 1, 5)
    rotations = torch.stack(
        [
            torch.stack([torch.cos(angles), -torch.sin(angles)], -1),
            torch.stack([torch.sin(angles), torch.cos(angles)], -1),
        ],
        -2,
    )
    coords = polar_coordinates(rotations)
    assert torch.allclose(coords[:, 0], angles.double(), atol=1e-6) and coords[:, 1:].abs().max() < 1e-6


def test_projection_coefficients_are_gram_schmidt():
    vectors = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    merged = projection_coefficients(vectors @ vectors.T, weights) @ vectors
    q, _ = torch.linalg.qr(vectors.T)
    expected = weights[0] * vectors[0]
    expected = expected + weights[1] * (vectors[1] - q[:, :1] @ (q[:, :1].T @ vectors[1]))
    expected = expected + weights[2] * (vectors[2] - q[:, :2] @ (q[:, :2].T @ vectors[2]))
    assert torch.allclose(merged, expected, atol=1e-12)


def test_every_method_declares_how_each_adapter_tensor_combines():
    from orthoft.adapters import REGISTERED
    from orthoft.adapters.combine import ROLES

    for peft_type, (_, tuner) in REGISTERED.items():
        layer_cls = tuner.tuner_layer_cls
        assert set(layer_cls.merge_roles) == set(layer_cls.adapter_layer_names), peft_type
        assert set(layer_cls.merge_roles.values()) <= set(ROLES), peft_type
        assert set(layer_cls.merge_references) <= set(layer_cls.merge_roles), peft_type


# ---- promises of each combination type ----------------------------------------------------------

SUPPORTED = {  # what each variant defines; everything else is refused (see the refusal tests)
    "oft_exact": ("lie", "compose", "fisher", "projection"),
    "oft_neumann": ("lie", "fisher", "projection"),
    "boft": ("lie", "fisher", "projection"),
    "boft1_exact": ("lie", "compose", "fisher", "projection"),
    "goft": ("lie", "fisher", "projection"),
    "qgoft": ("lie", "fisher", "projection"),
    "hra": ("compose",),
    "psoft": ("lie", "fisher", "projection", "linear"),
    "svft": ("lie", "compose", "fisher", "projection", "linear"),
}
ONE_HOT = [(kind, combination) for kind, combinations in SUPPORTED.items() for combination in combinations]


def test_declared_roles_give_the_supported_types():
    for kind, combinations in SUPPORTED.items():
        layer = next(iter(ortho_layers(tuner_of(build(kind))).values()))
        method_level = set(supported_combinations(layer))
        assert set(combinations) <= method_level, kind
        # what the roles allow but the settings rule out is refused when merging
        for combination in method_level - set(combinations):
            with pytest.raises(ValueError, match="Fix:"):
                build(kind).add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type=combination)


@pytest.mark.parametrize("kind,combination", ONE_HOT)
def test_weight_one_on_one_adapter_returns_it(kind, combination):
    model = build(kind)
    fisher = None
    if combination == "fisher":
        ones = {
            f"{n}.{t}": torch.ones_like(v["a"])
            for n, lay in ortho_layers(tuner_of(model)).items()
            for t, v in ((t, getattr(lay, t)) for t in lay.merge_roles)
            if "a" in v
        }
        fisher = {"a": ones, "b": ones}
    for weights, expected in (([1.0, 0.0], "a"), ([0.0, 1.0], "b")):
        name = f"m{weights[0]:.0f}"
        model.add_weighted_adapter(["a", "b"], weights, name, combination_type=combination, fisher=fisher)
        torch.testing.assert_close(outputs(model, name), outputs(model, expected), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["oft_exact", "boft", "goft", "psoft"])
def test_lie_stays_exactly_orthogonal(kind):
    model = build(kind, scale=0.2)
    model.add_weighted_adapter(["a", "b"], [0.3, 0.7], "m", combination_type="lie")
    for layer in ortho_layers(tuner_of(model)).values():
        if kind == "psoft":
            assert orthogonality_error(layer.rotation("m")) < 1e-5
            continue
        if kind == "boft":  # each factor is a block rotation, Neumann: as orthogonal as the sources' factors
            source = max(float(orthogonality_error(layer.rotations(a).detach())) for a in "ab")
            assert orthogonality_error(layer.rotations("m")) <= source * 1.01 + 1e-6
            continue
        dense = layer.transform_input("m", torch.eye(layer.in_features))
        assert orthogonality_error(dense) < 1e-5


def test_lie_with_neumann_stays_within_the_series_error():
    model = build("oft_neumann", scale=0.1)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type="lie")
    for layer in ortho_layers(tuner_of(model)).values():
        skew = unpack_skew(layer.orthoft_oft_Q["m"].double())
        bound = torch.linalg.matrix_norm(skew, ord=2).max() ** 10  # |Q|^(2k+2), k = 4
        assert orthogonality_error(layer.rotation_blocks("m")) <= bound + 1e-6


def test_lie_is_the_lie_algebra_mean_not_the_cayley_coordinate_mean():
    # with one adapter twice, weights (1, 1) give R^2 exactly (log coordinates add); Cayley(2Q) would not
    model = build("oft_exact", names=("a",), scale=0.3)
    model.add_adapter("a2", CONFIGS["oft_exact"]())
    for layer in ortho_layers(tuner_of(model)).values():
        layer.orthoft_oft_Q["a2"].data.copy_(layer.orthoft_oft_Q["a"].data)
    model.add_weighted_adapter(["a", "a2"], [1.0, 1.0], "m", combination_type="lie")
    for layer in ortho_layers(tuner_of(model)).values():
        rotation = layer.rotation_blocks("a")
        torch.testing.assert_close(layer.rotation_blocks("m"), rotation @ rotation, atol=1e-5, rtol=0)
        doubled = cayley_exact(unpack_skew(2 * layer.orthoft_oft_Q["a"].detach()))
        assert (doubled - rotation @ rotation).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["oft_exact", "boft1_exact", "hra", "svft"])
def test_compose_equals_applying_the_adapters_in_sequence(kind):
    names = ("a", "b", "c")
    model = build(kind, names=names, scale=0.2)
    model.add_weighted_adapter(list(names), [1.0, 1.0, 1.0], "m", combination_type="compose")
    torch.testing.assert_close(outputs(model, "m"), outputs(model, list(names)), atol=2e-5, rtol=1e-4)
    if kind != "svft":
        for dense in layer_rotations(model, "m"):
            assert orthogonality_error(dense) < 1e-5
    if kind == "hra":
        assert tuner_of(model).peft_config["m"].r == 12, "reflections concatenated"


def test_fisher_weights_pick_the_informed_adapter_and_equal_fishers_give_the_mean():
    model = build("oft_exact")

    def loss_fn(m, batch):
        return (m(batch) ** 2).mean()

    batches = [X[i : i + 1] for i in range(4)]
    fisher = {a: orthoft.estimate_fisher(model, a, batches, loss_fn=loss_fn) for a in "ab"}
    assert set(fisher["a"]) == {"lin0.orthoft_oft_Q", "lin1.orthoft_oft_Q"}
    assert all(float(v.min()) >= 0 and float(v.max()) > 0 for v in fisher["a"].values())
    assert tuner_of(model).active_adapters == ["a"], "active adapters restored"
    zeros = {k: torch.zeros_like(v) for k, v in fisher["b"].items()}
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "fa", "fisher", fisher={"a": fisher["a"], "b": zeros})
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "fe", "fisher", fisher={"a": fisher["a"], "b": fisher["a"]})
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mean", "lie")
    for layer in ortho_layers(tuner_of(model)).values():
        torch.testing.assert_close(layer.orthoft_oft_Q["fa"], layer.orthoft_oft_Q["a"], atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.orthoft_oft_Q["fe"], layer.orthoft_oft_Q["mean"], atol=1e-6, rtol=0)


def test_projection_drops_what_earlier_adapters_already_did():
    # the same update twice: the second is entirely inside the first's span, so it adds nothing
    model = build("oft_exact", names=("a",), scale=0.2)
    model.add_adapter("a2", CONFIGS["oft_exact"]())
    for layer in ortho_layers(tuner_of(model)).values():
        layer.orthoft_oft_Q["a2"].data.copy_(layer.orthoft_oft_Q["a"].data)
    model.add_weighted_adapter(["a", "a2"], [1.0, 1.0], "p", combination_type="projection")
    torch.testing.assert_close(outputs(model, "p"), outputs(model, "a"), atol=2e-5, rtol=1e-4)


def test_projection_of_additive_adapters_is_orthogonal_in_weight_space():
    model = build("svft", scale=0.3)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "p", combination_type="projection")
    for layer in ortho_layers(tuner_of(model)).values():
        delta_a, delta_p = (layer.get_delta_weight(n).detach().double() for n in ("a", "p"))
        added = delta_p - delta_a
        assert abs(float((added * delta_a).sum())) < 1e-6 * float(delta_a.norm() * added.norm())
        assert float(added.norm()) > 0


def test_linear_is_task_arithmetic_for_additive_methods():
    model = build("svft", scale=0.3)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.2], "l", combination_type="linear")
    for layer in ortho_layers(tuner_of(model)).values():
        expected = 0.7 * layer.get_delta_weight("a") - 0.2 * layer.get_delta_weight("b")
        torch.testing.assert_close(layer.get_delta_weight("l"), expected, atol=1e-6, rtol=1e-5)
    psoft = build("psoft", scale=0.3)
    psoft.add_weighted_adapter(["a", "b"], [0.5, 0.5], "l", combination_type="linear")
    for layer in ortho_layers(tuner_of(psoft)).values():
        mean = 0.5 * (layer.orthoft_psoft_a["a"] + layer.orthoft_psoft_a["b"])
        torch.testing.assert_close(layer.orthoft_psoft_a["l"], mean, atol=1e-6, rtol=0)


# ---- the merged adapter is an adapter like any other ----------------------------------------------


def test_merged_adapter_folds_into_the_base_saves_and_loads(tmp_path):
    model = build("oft_exact", scale=0.2)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type="lie")
    expected = outputs(model, "m")
    model.save_pretrained(tmp_path, selected_adapters=["m"])
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TinyMLP(), tmp_path / "m", adapter_name="m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, atol=1e-6, rtol=0)
        folded = loaded.merge_and_unload()
        torch.testing.assert_close(folded(X), expected, atol=2e-5, rtol=1e-4)


def test_heads_are_taken_from_one_adapter_never_averaged():
    torch.manual_seed(0)
    config = lambda: orthoft.OFTConfig(target_modules=["lin0"], block_size=8, modules_to_save=["lin1"])  # noqa: E731
    model = get_peft_model(TinyMLP(), config(), adapter_name="a")
    model.add_adapter("b", config())
    wrapper = next(m for m in model.modules() if isinstance(m, ModulesToSaveWrapper))
    with torch.no_grad():
        wrapper.modules_to_save["b"].weight.add_(1.0)
    with pytest.raises(ValueError, match="modules_to_save_from"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m")
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", modules_to_save_from="b")
    torch.testing.assert_close(wrapper.modules_to_save["m"].weight, wrapper.modules_to_save["b"].weight)


REFUSALS = [
    ("oft_exact", "linear", "rotations do not add"),
    ("oft_neumann", "compose", "use_exact_cayley=True"),
    ("boft", "compose", "not one butterfly"),
    ("hra", "lie", r"only their product"),
    ("qgoft", "compose", "not one cascade"),
    ("psoft", "compose", "no PSOFT update"),
]


@pytest.mark.parametrize("kind,combination,message", REFUSALS)
def test_undefined_combinations_are_refused_with_the_alternatives(kind, combination, message):
    model = build(kind)
    with pytest.raises(ValueError, match=message) as err:
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type=combination)
    assert "Fix:" in str(err.value)
    assert "m" not in tuner_of(model).peft_config, "nothing was added"


def test_hra_with_gram_schmidt_is_refused():
    model = get_peft_model(TinyMLP(), orthoft.HRAConfig(target_modules=TARGETS, r=4, apply_GS=True), adapter_name="a")
    model.add_adapter("b", orthoft.HRAConfig(target_modules=TARGETS, r=4, apply_GS=True))
    with pytest.raises(ValueError, match="apply_GS"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="compose")


def test_bad_requests_are_refused():
    model = build("oft_exact")
    with pytest.raises(ValueError, match="unknown"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="ties")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["a", "b"], [1], "m")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "a")
    with pytest.raises(ValueError, match="Fisher estimate"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="fisher")
    model.add_adapter("c", orthoft.OFTConfig(target_modules=TARGETS, block_size=4))
    with pytest.raises(ValueError, match="same config"):
        model.add_weighted_adapter(["a", "c"], [0.5, 0.5], "m")


# ---- a transformers model: export and the command line ---------------------------------------------


def tiny_llama_with_adapters(folder, method: str = "oft"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # the MiniLM tokenizer's vocabulary, so that a recipe's data can feed the Fisher estimate
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder / "base")
    adapter_config = {
        "oft": lambda: orthoft.OFTConfig(target_modules=["q_proj", "v_proj"], block_size=8, use_exact_cayley=True),
        "clover": lambda: orthoft.CLOVERConfig(),
    }[method]
    model = get_peft_model(LlamaForCausalLM.from_pretrained(folder / "base"), adapter_config(), adapter_name="a")
    model.add_adapter("b", adapter_config())
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in ortho_layers(tuner_of(model)).values():
            for tensor_name in layer.merge_roles:
                for value in getattr(layer, tensor_name).values():
                    value.add_(torch.randn(value.shape, generator=generator) * 0.1)
    for name in ("a", "b"):
        model.save_pretrained(folder / "adapters", selected_adapters=[name])
    return model.eval()


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def test_clover_linear_merge_on_llama(tmp_path):
    model = tiny_llama_with_adapters(tmp_path, "clover")
    model.add_weighted_adapter(["a", "b"], [1.0, 0.0], "m", combination_type="linear")
    with torch.no_grad():
        model.base_model.set_adapter("m")
        merged = model(input_ids=IDS).logits
        model.base_model.set_adapter("a")
        torch.testing.assert_close(merged, model(input_ids=IDS).logits, atol=1e-5, rtol=1e-4)


def test_merged_adapter_exports_like_any_other(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama_with_adapters(tmp_path)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type="lie")
    model.base_model.set_adapter("m")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    orthoft.export_merged(model, tmp_path / "export", adapter_names=["m"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_cli_merge_writes_a_loadable_adapter_folder(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = tiny_llama_with_adapters(tmp_path)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "api", combination_type="lie")
    model.base_model.set_adapter("api")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    adapters = [str(tmp_path / "adapters" / n) for n in "ab"]
    argv = ["merge", "--base", str(tmp_path / "base"), "--adapter", adapters[0], "--adapter", adapters[1]]
    assert main([*argv, "--method", "lie", "--out", str(tmp_path / "merged")]) == 0
    info = json.loads((tmp_path / "merged" / "orthoft_merge.json").read_text())
    assert info["weights"] == [0.5, 0.5] and info["method"] == "lie"
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base, tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-4)
    # errors are one line with the fix, and nothing is written
    capsys.readouterr()
    assert main([*argv, "--method", "linear", "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the loader's progress bar
    assert error.startswith("orthoft merge:") and "Fix:" in error
    assert not (tmp_path / "bad").exists()
    assert main([*argv, "--weights", "1", "--out", str(tmp_path / "bad")]) == 2
    assert main([*argv, "--out", str(tmp_path / "merged")]) == 2, "an existing OUT needs --overwrite"
    assert main([*argv, "--method", "compose", "--out", str(tmp_path / "merged"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "merged" / "orthoft_merge.json").read_text())["method"] == "compose"


def test_cli_merge_fisher_from_recipe_data_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.tiny_recipes import CAUSAL, write_recipe

    tiny_llama_with_adapters(tmp_path)
    recipe = write_recipe(CAUSAL, tmp_path / "recipe.yaml", data={"block_size": 16, "max_train_examples": 8})
    adapters = [str(tmp_path / "adapters" / n) for n in "ab"]
    argv = ["merge", "--base", str(tmp_path / "base"), "--adapter", adapters[0], "--adapter", adapters[1]]
    fisher = [
        "--method",
        "fisher",
        "--fisher-data",
        str(recipe),
        "--fisher-data",
        str(recipe),
        "--fisher-examples",
        "2",
    ]
    assert main([*argv, "--method", "fisher", "--out", str(tmp_path / "f")]) == 2, "fisher needs data"
    assert main([*argv, *fisher, "--out", str(tmp_path / "f")]) == 0
    assert main([*argv, *fisher, "--export", "--out", str(tmp_path / "export")]) == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    adapter_model = PeftModel.from_pretrained(base, tmp_path / "f").eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        expected = adapter_model(input_ids=IDS).logits
        torch.testing.assert_close(exported(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)
