"""PSOFT: frozen principal-subspace factors, orthogonal core, and parity with PEFT's PSOFT."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import orthoft
from orthoft.adapters.psoft import PSOFTLayer
from orthoft.optim.views import VECTOR
from tests.helpers import clone, make_model, perturb_adapters


def psoft_layers(model) -> list[PSOFTLayer]:
    return [m for m in model.modules() if isinstance(m, PSOFTLayer)]


def test_factors_span_the_principal_subspace_and_rotation_is_orthogonal():
    model, _, targets = make_model("linear")
    weights = {name: getattr(model, name).weight.detach().clone() for name in targets}
    peft_model = get_peft_model(
        model, orthoft.PSOFTConfig(target_modules=targets, r=6, use_exact_cayley=True)
    )
    perturb_adapters(peft_model, 0.1)
    for layer in psoft_layers(peft_model):
        factor_a = layer.orthoft_psoft_A["default"]
        factor_b = layer.orthoft_psoft_B["default"]
        assert not factor_a.requires_grad and not factor_b.requires_grad
        assert torch.allclose(factor_a @ factor_a.T, torch.eye(6), atol=1e-5), "A must have orthonormal rows"
        u, s, vh = torch.linalg.svd(weights[layer.module_name.split(".")[-1]], full_matrices=False)
        # B A is the best rank-6 approximation of W
        assert torch.allclose(factor_b @ factor_a, (u[:, :6] * s[:6]) @ vh[:6], atol=1e-5)
        rotation = layer.rotation("default")
        assert (rotation.T @ rotation - torch.eye(6)).abs().max() < 1e-5
        assert (layer.core("default") - rotation).abs().max() > 1e-3, "a and b were perturbed too"


def test_neumann_rotation_is_nearly_orthogonal_within_the_norm_bound():
    model, _, targets = make_model("linear")
    peft_model = get_peft_model(
        model, orthoft.PSOFTConfig(target_modules=targets, r=8)
    )  # degree 4, bound 0.9
    perturb_adapters(peft_model, 1.0)  # far outside the bound: gets projected back onto it
    for layer in psoft_layers(peft_model):
        rotation = layer.rotation("default")
        assert (rotation.T @ rotation - torch.eye(8)).abs().max() < 0.02


def test_parameter_count_and_optional_vectors():
    model, _, targets = make_model("linear")
    peft_model = get_peft_model(model, orthoft.PSOFTConfig(target_modules=targets, r=8))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 2 * (8 * 7 // 2 + 2 * 8)
    model, _, _ = make_model("linear")
    config = orthoft.PSOFTConfig(target_modules=targets, r=8, train_scale_a=False, train_scale_b=False)
    peft_model = get_peft_model(model, config)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 2 * 28
    assert PSOFTLayer.optimizer_views["orthoft_psoft_skew"] == "skew_packed"
    assert PSOFTLayer.optimizer_views["orthoft_psoft_a"] == VECTOR


def test_rank_larger_than_layer_is_a_clear_error():
    model, _, targets = make_model("linear")
    with pytest.raises(ValueError, match="Fix"):
        get_peft_model(model, orthoft.PSOFTConfig(target_modules=targets, r=20))  # lin1 is 32 -> 16


def test_factors_are_saved_so_loading_never_recomputes_an_svd(tmp_path):
    model, x, targets = make_model("linear")
    peft_model = get_peft_model(model, orthoft.PSOFTConfig(target_modules=targets, r=4, svd="lowrank"))
    perturb_adapters(peft_model)
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("orthoft_psoft_A") for k in saved) and any(
        k.endswith("orthoft_psoft_B") for k in saved
    )
    # tamper with the stored factors: the loaded model must use them, not a fresh SVD
    key = next(k for k in saved if k.endswith("lin0.orthoft_psoft_B"))
    saved[key] = saved[key] * 2
    from safetensors.torch import save_file

    save_file(saved, tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(make_model("linear")[0], tmp_path)
    assert torch.equal(loaded.base_model.model.lin0.orthoft_psoft_B["default"], saved[key])
    assert not torch.allclose(loaded(x), expected)


def test_bf16_model_keeps_float32_factors_and_its_dtype():
    model, x, targets = make_model("linear")
    reference = clone(model).to(torch.bfloat16)
    peft_model = get_peft_model(model.to(torch.bfloat16), orthoft.PSOFTConfig(target_modules=targets, r=4))
    layer = psoft_layers(peft_model)[0]
    assert layer.orthoft_psoft_A["default"].dtype == torch.float32
    out = peft_model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference(x.to(torch.bfloat16)).float(), atol=2e-2)


# ---- parity with PEFT's PSOFT ---------------------------------------------------------------------


def _peft_and_ours(peft_kwargs: dict, our_kwargs: dict, r: int = 6):
    model, x, targets = make_model("linear")
    theirs = get_peft_model(clone(model), peft.PsoftConfig(target_modules=targets, r=r, **peft_kwargs))
    ours = get_peft_model(model, orthoft.PSOFTConfig(target_modules=targets, r=r, **our_kwargs))
    # same trained state on both sides: PEFT's packed skew uses the same triu order as ours
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in targets:
            peft_core = getattr(theirs.base_model.model, name).psoft_R["default"]
            our_layer = getattr(ours.base_model.model, name)
            peft_core.weight.copy_(torch.randn(peft_core.weight.shape, generator=generator) * 0.08)
            peft_core.vector_a.copy_(1 + 0.1 * torch.randn(r, generator=generator))
            peft_core.vector_b.copy_(1 + 0.1 * torch.randn(r, generator=generator))
            our_layer.orthoft_psoft_skew["default"].copy_(peft_core.weight)
            our_layer.orthoft_psoft_a["default"].copy_(peft_core.vector_a)
            our_layer.orthoft_psoft_b["default"].copy_(peft_core.vector_b)
    return theirs, ours, x, targets


@pytest.mark.parametrize(
    "peft_kwargs,our_kwargs",
    [
        # exact Cayley: PEFT solves X (I - Q) = I + Q, i.e. (I + Q)(I - Q)^{-1}, our convention; it never
        # bounds |Q| there, so parity needs max_skew_norm=None
        ({}, {"use_exact_cayley": True, "max_skew_norm": None}),
        # PEFT's num_cayley_neumann_terms=t is neumann_degree=t-2; cayley_neumann_eps is max_skew_norm
        (
            {"use_cayley_neumann": True, "num_cayley_neumann_terms": 5, "cayley_neumann_eps": 0.3},
            {"neumann_degree": 3, "max_skew_norm": 0.3},
        ),
        # randomized SVD: same call under the same seed gives the same factors
        (
            {"psoft_svd": "lowrank", "psoft_svd_lowrank_niter": 4, "random_seed": 3},
            {
                "svd": "lowrank",
                "svd_niter": 4,
                "svd_seed": 3,
                "use_exact_cayley": True,
                "max_skew_norm": None,
            },
        ),
    ],
    ids=["exact", "neumann", "lowrank_svd"],
)
def test_parity_with_peft_psoft(peft_kwargs, our_kwargs):
    theirs, ours, x, targets = _peft_and_ours(peft_kwargs, our_kwargs)
    if "cayley_neumann_eps" in peft_kwargs:  # the norm bound must be active for this to test it
        skew = ours.base_model.model.lin0.orthoft_psoft_skew["default"]
        assert 2**0.5 * skew.norm() > peft_kwargs["cayley_neumann_eps"]
    for name in targets:
        peft_layer = getattr(theirs.base_model.model, name)
        our_layer = getattr(ours.base_model.model, name)
        peft_a, peft_b = peft_layer._get_psoft_ab_cache_buffers("default")
        scaling = peft_layer.scaling["default"]
        # PEFT stores B / scaling and multiplies the output by scaling: psoft_alpha cancels out exactly
        assert torch.allclose(our_layer.orthoft_psoft_A["default"], peft_a, atol=1e-6)
        assert torch.allclose(our_layer.orthoft_psoft_B["default"], peft_b * scaling, atol=1e-5)
        assert torch.allclose(
            our_layer.get_delta_weight("default"), peft_layer.get_delta_weight("default"), atol=1e-5
        )
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
