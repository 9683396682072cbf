"""SVFT: sparsity patterns, zero init, sparse application, truncated bases and what is saved."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import orthoft
from orthoft.adapters.svft import SVFTLayer
from orthoft.orthogonal.sparsity import banded_count, sparsity_indices
from tests.helpers import clone, make_model, perturb_adapters


class Square(nn.Module):
    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def svft_layers(model) -> list[SVFTLayer]:
    return [m for m in model.modules() if isinstance(m, SVFTLayer)]


def test_plain_and_banded_patterns():
    diagonal = sparsity_indices("plain", 5)
    assert torch.equal(diagonal[0], diagonal[1]) and diagonal.shape == (2, 5)
    band = sparsity_indices("banded", 7, bandwidth=2)
    assert band.shape[1] == banded_count(7, 2) == 7 * 5 - 2 * 3
    assert ((band[0] - band[1]).abs() <= 2).all()
    assert len({tuple(p) for p in band.T.tolist()}) == band.shape[1]
    assert banded_count(3, 5) == 9  # a band wider than the matrix is the whole matrix
    assert sparsity_indices("banded", 3, bandwidth=5).shape[1] == 9


def test_random_pattern_is_seeded_unique_and_defaults_to_the_banded_budget():
    first = sparsity_indices("random", 10, num_entries=17, seed=3)
    assert first.shape == (2, 17)
    assert torch.equal(first, sparsity_indices("random", 10, num_entries=17, seed=3))
    assert not torch.equal(first, sparsity_indices("random", 10, num_entries=17, seed=4))
    assert len({tuple(p) for p in first.T.tolist()}) == 17
    assert sparsity_indices("random", 10, bandwidth=1).shape[1] == banded_count(10, 1)


def test_top_k_picks_the_most_aligned_singular_pairs():
    torch.manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(8, 8))
    index = sparsity_indices("top_k", 8, num_entries=5, u=u, v=vh.T)
    alignment = (u.T @ vh.T).abs()
    chosen = alignment[index[0], index[1]]
    assert chosen.min() >= alignment.flatten().topk(5).values.min() - 1e-7


def test_top_k_on_a_non_square_layer_is_a_clear_error():
    model, _, targets = make_model("linear")
    with pytest.raises(ValueError, match="Fix"):
        get_peft_model(model, orthoft.SVFTConfig(target_modules=targets, pattern="top_k", num_entries=4))


@pytest.mark.parametrize("pattern", ["plain", "banded", "random", "top_k"])
def test_each_pattern_starts_at_zero_and_matches_the_dense_formula(pattern):
    model = Square()
    x = torch.randn(3, 4, 24)
    reference = clone(model)
    config = orthoft.SVFTConfig(target_modules=["proj"], pattern=pattern, num_entries=30, bandwidth=1)
    peft_model = get_peft_model(model, config)
    layer = svft_layers(peft_model)[0]
    assert torch.equal(
        layer.orthoft_svft_values["default"], torch.zeros_like(layer.orthoft_svft_values["default"])
    )
    assert torch.equal(peft_model(x), reference(x))
    expected_count = {"plain": 24, "banded": banded_count(24, 1), "random": 30, "top_k": 30}[pattern]
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected_count
    perturb_adapters(peft_model, 0.1)
    # W' = U (S + M) V^T with the dense M
    u, v = layer.orthoft_svft_U["default"], layer.orthoft_svft_V["default"]
    weight = reference.proj.weight.detach()
    dense_m = layer.dense_m("default")
    assert (dense_m != 0).sum() == expected_count
    expected = x @ (weight + u @ dense_m @ v.T).T + reference.proj.bias
    assert torch.allclose(peft_model(x), expected, atol=1e-5)


def test_sparse_application_equals_the_dense_product():
    model = Square()
    peft_model = get_peft_model(
        model, orthoft.SVFTConfig(target_modules=["proj"], pattern="random", num_entries=50)
    )
    perturb_adapters(peft_model, 0.1)
    layer = svft_layers(peft_model)[0]
    coords = torch.randn(24, 5)  # features first
    expected = layer.dense_m("default") @ coords
    assert torch.allclose(layer.sparse_apply("default", coords), expected, atol=1e-6)


def test_truncated_basis_keeps_the_residual_exactly():
    model, x, targets = make_model("linear")
    reference = clone(model)
    peft_model = get_peft_model(model, orthoft.SVFTConfig(target_modules=targets, rank=5, pattern="banded"))
    assert torch.equal(peft_model(x), reference(x)), "truncation must not drop W - U_r S_r V_r^T"
    perturb_adapters(peft_model, 0.1)
    for layer in svft_layers(peft_model):
        u, v = layer.orthoft_svft_U["default"], layer.orthoft_svft_V["default"]
        assert u.shape[1] == v.shape[1] == 5
        assert torch.allclose(u.T @ u, torch.eye(5), atol=1e-5) and torch.allclose(
            v.T @ v, torch.eye(5), atol=1e-5
        )
        weight = layer.dense_base_weight()
        # the update lives in the top-5 singular subspaces; everything else of W is untouched
        delta = layer.get_delta_weight("default")
        assert torch.allclose(delta, u @ layer.dense_m("default") @ v.T, atol=1e-6)
        top_u, top_s, top_vh = torch.linalg.svd(weight, full_matrices=False)
        assert torch.allclose((u * top_u[:, :5]).sum(0).abs(), torch.ones(5), atol=1e-4), (
            "same singular vectors"
        )
        residual = weight - (top_u[:, :5] * top_s[:5]) @ top_vh[:5]
        merged_residual = (weight + delta) - u @ (u.T @ (weight + delta) @ v) @ v.T
        assert torch.allclose(merged_residual, residual, atol=1e-4)


def test_full_basis_parameter_count_and_truncated_lowrank_svd():
    model, _, targets = make_model("linear")  # lin0 64 -> 32, lin1 32 -> 16
    peft_model = get_peft_model(model, orthoft.SVFTConfig(target_modules=targets, pattern="plain"))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 32 + 16
    model, x, _ = make_model("linear")
    config = orthoft.SVFTConfig(target_modules=targets, pattern="plain", rank=4, svd="lowrank")
    peft_model = get_peft_model(model, config)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 8
    with pytest.raises(ValueError, match="Fix"):
        orthoft.SVFTConfig(svd="lowrank")


@pytest.mark.parametrize(
    "kwargs,stores",
    [
        ({}, False),
        ({"rank": 6}, True),
        ({"store_basis": True}, True),
        ({"rank": 6, "store_basis": False}, False),
    ],
)
def test_basis_storage_and_exact_round_trip(kwargs, stores, tmp_path):
    model, x, targets = make_model("conv1d")
    peft_model = get_peft_model(model, orthoft.SVFTConfig(target_modules=targets, pattern="random", **kwargs))
    perturb_adapters(peft_model)
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("orthoft_svft_U") for k in saved) == stores
    assert any(k.endswith("orthoft_svft_index") for k in saved), "the sparsity pattern is always saved"
    loaded = PeftModel.from_pretrained(make_model("conv1d")[0], tmp_path)
    assert torch.equal(loaded(x), expected)
