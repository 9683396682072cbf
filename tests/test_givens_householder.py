"""qGOFT/GOFT (Givens) and HRA (Householder): the math and the method-specific promises."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft import get_peft_model
from torch import nn

import orthoft
from orthoft.orthogonal.givens import (
    angles_to_blocks,
    apply_givens,
    givens_matrix,
    givens_plan,
    identity_blocks,
    quasi_orthogonality_penalty,
)
from orthoft.orthogonal.householder import apply_householder
from tests.helpers import TinyMLP, layer_matrix, perturb_adapters


def _eye_error(m: torch.Tensor) -> float:
    return (m.T @ m - torch.eye(m.shape[0], dtype=m.dtype)).abs().max().item()


@pytest.mark.parametrize("d", [2, 8, 12, 17, 64, 100])
@pytest.mark.parametrize("layout", ["tree", "butterfly"])
def test_every_givens_level_is_orthogonal(d, layout):
    plan = givens_plan(d, layout)
    blocks = angles_to_blocks(torch.randn(plan.num_pairs, dtype=torch.float64))
    product = torch.eye(d, dtype=torch.float64)
    for layer in range(1, plan.num_layers + 1):
        g = layer_matrix(blocks, plan, layer)
        assert _eye_error(g) < 1e-12, f"layer {layer} of d={d} is not orthogonal"
        product = g @ product
    # the fast path equals the product of the per-level matrices, padding included
    assert torch.allclose(givens_matrix(blocks, plan), product, atol=1e-12)
    assert _eye_error(product) < 1e-12


@pytest.mark.parametrize("d", [8, 12, 17, 768])
def test_tree_layout_has_d_minus_1_pairs_for_any_d(d):
    assert givens_plan(d, "tree").num_pairs == d - 1


def test_tree_reaches_every_input_and_butterfly_mixes_all():
    d = 16
    torch.manual_seed(0)
    tree = givens_matrix(angles_to_blocks(torch.rand(d - 1) + 0.2), givens_plan(d, "tree"))
    assert (tree[0].abs() > 1e-6).all(), "coordinate 0 of the tree depends on every input"
    plan = givens_plan(d, "butterfly")
    butterfly = givens_matrix(angles_to_blocks(torch.rand(plan.num_pairs) + 0.2), plan)
    assert (butterfly.abs() > 1e-6).all()


@pytest.mark.parametrize("layout", ["tree", "butterfly"])
def test_quasi_blocks_inverse_and_transpose_are_exact(layout):
    d = 12
    plan = givens_plan(d, layout)
    blocks = identity_blocks(plan.num_pairs, torch.float64) + 0.3 * torch.randn(
        plan.num_pairs, 2, 2, dtype=torch.float64
    )
    r = givens_matrix(blocks, plan)
    x = torch.randn(5, d, dtype=torch.float64)
    assert torch.allclose(apply_givens(x, blocks, plan), x @ r.T)
    assert torch.allclose(apply_givens(x, blocks, plan, transpose=True), x @ r)
    assert torch.allclose(apply_givens(x, blocks, plan, inverse=True), x @ torch.linalg.inv(r).T)


def test_quasi_penalty_is_zero_for_orthogonal_columns_only():
    assert quasi_orthogonality_penalty(identity_blocks(7)) == 0
    scaled_rotations = angles_to_blocks(torch.randn(7)) * 3.0  # orthogonal columns, free norms
    assert quasi_orthogonality_penalty(scaled_rotations) < 1e-10
    sheared = identity_blocks(7)
    sheared[:, 0, 1] = 0.5
    assert quasi_orthogonality_penalty(sheared) == pytest.approx(7 * 0.25)


def test_regularization_loss_sums_active_adapters():
    model = get_peft_model(TinyMLP(), orthoft.QGOFTConfig(target_modules=["lin0", "lin1"], reg_lambda=0.1))
    assert orthoft.regularization_loss(model).item() == 0.0  # identity blocks
    perturb_adapters(model, 0.1)
    loss = orthoft.regularization_loss(model)
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    strict = get_peft_model(TinyMLP(), orthoft.QGOFTConfig(target_modules=["lin0"], strict=True))
    perturb_adapters(strict, 0.1)
    assert orthoft.regularization_loss(strict).item() == 0.0  # exactly orthogonal: no penalty


def test_qgoft_parameter_counts():
    quasi = get_peft_model(TinyMLP(), orthoft.QGOFTConfig(target_modules=["lin0"]))
    strict = get_peft_model(TinyMLP(), orthoft.QGOFTConfig(target_modules=["lin0"], strict=True))
    assert quasi.get_nb_trainable_parameters()[0] == 4 * 63
    assert strict.get_nb_trainable_parameters()[0] == 63


# ---- HRA -----------------------------------------------------------------------------------------


def test_hra_odd_r_is_a_clear_error():
    with pytest.raises(ValueError, match=r"r=3 is odd.*Fix: use an even r"):
        orthoft.HRAConfig(r=3)
    # a random (non-identity) start may use any r
    assert orthoft.HRAConfig(r=3, init_weights=False).r == 3


def test_hra_r_larger_than_features_error():
    with pytest.raises(ValueError, match="exceed the 32 input features of lin1"):
        get_peft_model(TinyMLP(), orthoft.HRAConfig(target_modules=["lin1"], r=34))


def test_hra_parity_with_peft_given_the_same_vectors():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 40))
    x = torch.randn(6, 64)
    theirs = get_peft_model(copy.deepcopy(base), peft.HRAConfig(r=8, target_modules=["0"]))
    ours = get_peft_model(copy.deepcopy(base), orthoft.HRAConfig(r=8, target_modules=["0"]))
    u = torch.randn(64, 8)
    with torch.no_grad():
        theirs.base_model.model[0].hra_u["default"].copy_(u)
        ours.base_model.model[0].orthoft_hra_U["default"].copy_(u)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_householder_chain_matches_dense_reflections():
    d, r = 20, 6
    u = torch.randn(d, r, dtype=torch.float64)
    dense = torch.eye(d, dtype=torch.float64)
    for i in range(r):  # H = H_1 ... H_r
        v = u[:, i : i + 1]
        dense = dense @ (torch.eye(d, dtype=torch.float64) - 2 * v @ v.T / (v.T @ v))
    x = torch.randn(4, d, dtype=torch.float64)
    assert torch.allclose(apply_householder(x, u), x @ dense.T)
    assert torch.allclose(apply_householder(x, u, transpose=True), x @ dense)
    assert _eye_error(dense) < 1e-12


def test_hra_regularizer_values():
    model = get_peft_model(TinyMLP(), orthoft.HRAConfig(target_modules=["lin0"], r=4, reg_lambda=1.0))
    layer = model.base_model.model.lin0
    # paired init: each repeated pair contributes two off-diagonal ones, so about sqrt(r)
    assert orthoft.regularization_loss(model).item() == pytest.approx(2.0, abs=0.3)
    with torch.no_grad():
        layer.orthoft_hra_U["default"].copy_(torch.linalg.qr(torch.randn(64, 4))[0] * 5)
    assert orthoft.regularization_loss(model).item() < 1e-5  # orthogonal vectors, any norms
    gs = get_peft_model(TinyMLP(), orthoft.HRAConfig(target_modules=["lin0"], r=4, apply_GS=True))
    assert orthoft.regularization_loss(gs).item() == 0.0


def test_hra_gram_schmidt_variant_is_orthogonal_for_any_u():
    model = get_peft_model(TinyMLP(), orthoft.HRAConfig(target_modules=["lin0"], r=6, apply_GS=True))
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.orthoft_hra_U["default"].normal_()
        dense = layer.transform_input("default", torch.eye(64))
    assert _eye_error(dense) < 1e-5
