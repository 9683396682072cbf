"""qGOFT / GOFT: the log-depth Givens math (every level, any d) and the adapter's options and penalty."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

import orthoft
from orthoft.orthogonal import (
    angles_to_blocks,
    apply_givens,
    givens_matrix,
    givens_pairs,
    givens_plan,
    identity_blocks,
    invert_blocks,
    quasi_orthogonality_penalty,
)
from tests.helpers import layer_matrix, make_model, perturb_adapters

DIMS = [2, 3, 5, 6, 8, 12, 16, 24, 33, 64, 72]
LAYOUTS = ["tree", "butterfly"]
F64 = torch.float64


def random_angles(plan, scale=1.0):
    return torch.randn(plan.num_pairs, dtype=F64) * scale


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", DIMS)
def test_pairs_follow_fft_strides_and_stay_inside_d(layout, d):
    plan = givens_plan(d, layout)
    assert plan.num_layers == math.ceil(math.log2(d))
    for r, (left, right) in enumerate(givens_pairs(plan), start=1):
        assert torch.equal(right - left, torch.full_like(left, 2 ** (r - 1)))
        assert torch.equal(left // 2**r, right // 2**r), "a pair must sit inside one block of 2^r"
        assert int(right.max()) < d
        touched = torch.cat([left, right])
        assert len(set(touched.tolist())) == len(touched), "pairs of one layer must be disjoint"
        if layout == "tree":
            assert torch.equal(left % 2**r, torch.zeros_like(left))


@pytest.mark.parametrize("d", DIMS + [100, 768, 1000])
def test_tree_has_d_minus_1_pairs_for_any_d(d):
    # the paper's count: DeBERTaV3-base qGOFT has 4 (d - 1) numbers per module
    assert givens_plan(d, "tree").num_pairs == d - 1


@pytest.mark.parametrize("d", [2, 4, 8, 16, 64])
def test_butterfly_has_half_d_pairs_per_layer_for_powers_of_two(d):
    plan = givens_plan(d, "butterfly")
    assert all(len(left) == d // 2 for left, _ in givens_pairs(plan))
    assert plan.num_pairs == d // 2 * int(math.log2(d))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", DIMS)
def test_every_level_is_orthogonal_and_the_product_matches_the_levels(layout, d):
    plan = givens_plan(d, layout)
    blocks = angles_to_blocks(random_angles(plan))
    eye = torch.eye(d, dtype=F64)
    product = eye
    for r in range(1, plan.num_layers + 1):
        level = layer_matrix(blocks, plan, r)  # built from the pair list, not from apply_givens
        assert torch.allclose(level.T @ level, eye, atol=1e-12), f"layer {r} is not orthogonal"
        product = level @ product
    dense = givens_matrix(blocks, plan)
    assert torch.allclose(dense, product, atol=1e-12)
    assert torch.allclose(dense.T @ dense, eye, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [5, 8, 12])
def test_quasi_blocks_all_four_variants_match_dense(layout, d):
    plan = givens_plan(d, layout)
    blocks = identity_blocks(plan.num_pairs, F64) + 0.3 * torch.randn(plan.num_pairs, 2, 2, dtype=F64)
    dense = givens_matrix(blocks, plan)
    x = torch.randn(4, 3, d, dtype=F64)
    inv = torch.linalg.inv(dense)
    assert torch.allclose(apply_givens(x, blocks, plan), x @ dense.T, atol=1e-10)
    assert torch.allclose(apply_givens(x, blocks, plan, transpose=True), x @ dense, atol=1e-10)
    assert torch.allclose(apply_givens(x, blocks, plan, inverse=True), x @ inv.T, atol=1e-10)
    assert torch.allclose(apply_givens(x, blocks, plan, transpose=True, inverse=True), x @ inv, atol=1e-10)


def autograd_dense(blocks, plan):
    """``R = G_L ... G_1`` from plain differentiable ops (no custom backward), the gradient reference."""
    d, offset = plan.features, 0
    dense = torch.eye(d, dtype=blocks.dtype)
    for left, right in givens_pairs(plan):
        layer = blocks[offset : offset + len(left)]
        offset += len(left)
        rows = torch.cat([left, left, right, right])
        cols = torch.cat([left, right, left, right])
        values = torch.cat([layer[:, 0, 0], layer[:, 0, 1], layer[:, 1, 0], layer[:, 1, 1]])
        level = torch.eye(d, dtype=blocks.dtype).index_put((rows, cols), values)
        dense = level @ dense
    return dense


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [5, 20, 33, 72])
@pytest.mark.parametrize("transpose,inverse", [(False, False), (True, False), (False, True)])
def test_product_gradients_match_plain_autograd(layout, d, transpose, inverse):
    # the custom backward replays the layers and skips the tree's padding pairs: both must not change a gradient
    plan = givens_plan(d, layout)
    blocks = identity_blocks(plan.num_pairs, F64) + 0.3 * torch.randn(plan.num_pairs, 2, 2, dtype=F64)
    blocks.requires_grad_(True)
    x = torch.randn(6, d, dtype=F64, requires_grad=True)
    upstream = torch.randn(6, d, dtype=F64)
    grads = torch.autograd.grad((apply_givens(x, blocks, plan, transpose, inverse) * upstream).sum(), (x, blocks))
    dense = autograd_dense(blocks, plan)
    dense = torch.linalg.inv(dense) if inverse else dense
    reference = x @ (dense if transpose else dense.T)
    expected = torch.autograd.grad((reference * upstream).sum(), (x, blocks))
    assert torch.allclose(grads[0], expected[0], atol=1e-9)
    assert torch.allclose(grads[1], expected[1], atol=1e-9)


@pytest.mark.parametrize("d", [3, 6, 72])
def test_non_power_of_two_leaves_out_of_range_pairs_as_identity(d):
    plan = givens_plan(d, "butterfly")
    assert plan.padded == 2 ** math.ceil(math.log2(d)) and plan.valid is not None
    blocks = angles_to_blocks(random_angles(plan))
    # the last coordinate has no partner at the top level: its row of the top layer is e_last
    top = layer_matrix(blocks, plan, plan.num_layers)
    left, right = givens_pairs(plan)[-1]
    untouched = sorted(set(range(d)) - set(left.tolist()) - set(right.tolist()))
    assert untouched, "some coordinate must lack a partner in the top layer"
    assert torch.equal(top[untouched][:, untouched], torch.eye(len(untouched), dtype=F64))
    # and padding never leaks: the d x d result is orthogonal
    dense = givens_matrix(blocks, plan)
    assert torch.allclose(dense.T @ dense, torch.eye(d, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("d", [8, 13, 64])
def test_tree_d_minus_1_angles_reach_every_direction(d):
    """The paper's equivalence: d - 1 tree angles move any unit vector onto e_0 (and back)."""
    plan = givens_plan(d, "tree")
    v = torch.randn(d, dtype=F64)
    angles = torch.zeros(plan.num_pairs, dtype=F64)
    current, offset = v.clone(), 0
    for left, right in givens_pairs(plan):
        a, b = current[left], current[right]
        # [[c, -s], [s, c]] [a; b] = [rho; 0] with theta = atan2(-b, a)
        angles[offset : offset + len(left)] = torch.atan2(-b, a)
        current[left], current[right] = torch.sqrt(a * a + b * b), 0.0
        offset += len(left)
    rotated = apply_givens(v, angles_to_blocks(angles), givens_plan(d, "tree"))
    expected = torch.zeros(d, dtype=F64)
    expected[0] = v.norm()
    assert torch.allclose(rotated, expected, atol=1e-10)


@pytest.mark.parametrize("d", [8, 16, 32])
def test_butterfly_product_mixes_every_coordinate(d):
    plan = givens_plan(d, "butterfly")
    dense = givens_matrix(angles_to_blocks(random_angles(plan) + 0.5), plan)
    assert (dense.abs() > 1e-9).all(), "every output must depend on every input"


def test_tree_product_connects_every_input_to_coordinate_0():
    plan = givens_plan(16, "tree")
    dense = givens_matrix(angles_to_blocks(random_angles(plan) + 0.5), plan)
    assert (dense[0].abs() > 1e-9).all()


def test_fewer_layers_mix_only_inside_blocks():
    plan = givens_plan(16, "butterfly", num_layers=2)
    dense = givens_matrix(angles_to_blocks(random_angles(plan) + 0.5), plan)
    block_of = torch.arange(16) // 4
    assert torch.equal(dense.abs() > 1e-12, block_of[:, None] == block_of[None, :])


def test_quasi_penalty_is_the_squared_column_inner_product():
    blocks = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [0.0, 5.0]]])
    # columns (1, 3), (2, 4): <.,.> = 14; second block has orthogonal columns of unequal norms
    assert quasi_orthogonality_penalty(blocks).item() == pytest.approx(196.0)
    assert quasi_orthogonality_penalty(identity_blocks(7)).item() == 0.0
    scaled_rotation = angles_to_blocks(torch.tensor([0.3])) * torch.tensor([2.0, 0.5])
    assert quasi_orthogonality_penalty(scaled_rotation).item() == pytest.approx(0.0, abs=1e-12)


def test_invert_blocks_is_exact():
    blocks = torch.randn(10, 2, 2, dtype=F64) + 2 * torch.eye(2, dtype=F64)
    assert torch.allclose(invert_blocks(blocks) @ blocks, torch.eye(2, dtype=F64).expand(10, 2, 2), atol=1e-12)


def test_plan_errors_are_actionable():
    with pytest.raises(ValueError, match="layout.*Fix"):
        givens_plan(8, "spiral")
    with pytest.raises(ValueError, match="num_layers 4 .*Fix"):
        givens_plan(8, "tree", num_layers=4)
    with pytest.raises(ValueError, match="Fix"):
        givens_plan(1)
    plan = givens_plan(8)
    with pytest.raises(ValueError, match=r"\(7, 2, 2\)"):
        apply_givens(torch.randn(2, 8), identity_blocks(6), plan)


def test_apply_keeps_dtype_and_runs_in_bfloat16():
    plan = givens_plan(12)
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    out = apply_givens(x, angles_to_blocks(torch.randn(plan.num_pairs) * 0.1), plan)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


# ---- adapter ---------------------------------------------------------------------------


def qgoft_layers(model):
    return [m for m in model.modules() if isinstance(m, orthoft.adapters.QGOFTLayer)]


def test_defaults_are_quasi_tree_with_4_numbers_per_pair():
    config = orthoft.QGOFTConfig(target_modules=["lin0", "lin1"])
    assert not config.strict and config.layout == "tree" and config.peft_type == "ORTHOFT_QGOFT"
    model, _, _ = make_model("linear")
    peft_model = get_peft_model(model, config)
    layers = qgoft_layers(peft_model)
    for layer in layers:
        assert layer.orthoft_qgoft_blocks["default"].shape == (layer.in_features - 1, 2, 2)
        assert "default" not in layer.orthoft_qgoft_angles
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 4 * (63 + 31)


def test_strict_stores_one_angle_per_pair_and_is_orthogonal_on_conv2d():
    model, _, targets = make_model("conv2d")  # in_features 72, 24, 32, 16
    peft_model = get_peft_model(model, orthoft.QGOFTConfig(target_modules=targets, strict=True))
    perturb_adapters(peft_model, 0.3)
    for layer in qgoft_layers(peft_model):
        assert layer.orthoft_qgoft_angles["default"].shape == (layer.in_features - 1,)
        eye = torch.eye(layer.in_features)
        with torch.no_grad():
            dense = layer.transform_input("default", eye)
        assert torch.allclose(dense.T @ dense, eye, atol=1e-5)
        assert layer.regularization_loss("default") is None


def test_num_layers_is_capped_by_each_module():
    model, _, _ = make_model("linear")  # 64 and 32 input features: 6 and 5 layers
    peft_model = get_peft_model(model, orthoft.QGOFTConfig(target_modules=["lin0", "lin1"], num_layers=6))
    plans = [layer.plan("default") for layer in qgoft_layers(peft_model)]
    assert sorted(p.num_layers for p in plans) == [5, 6]


def test_regularization_loss_zero_at_init_then_lambda_times_penalty():
    model, x, _ = make_model("linear")
    peft_model = get_peft_model(model, orthoft.QGOFTConfig(target_modules=["lin0", "lin1"], reg_lambda=0.01))
    loss = orthoft.regularization_loss(peft_model)
    assert loss.ndim == 0 and loss.item() == 0.0
    perturb_adapters(peft_model, 0.1)
    expected = sum(
        0.01 * quasi_orthogonality_penalty(layer.orthoft_qgoft_blocks["default"]) for layer in qgoft_layers(peft_model)
    )
    loss = orthoft.regularization_loss(peft_model)
    assert loss.item() > 0 and torch.allclose(loss, expected)
    (peft_model(x).square().mean() + loss).backward()
    for layer in qgoft_layers(peft_model):
        assert torch.isfinite(layer.orthoft_qgoft_blocks["default"].grad).all()


def test_regularization_loss_counts_only_active_adapters():
    model, _, _ = make_model("linear")
    peft_model = get_peft_model(model, orthoft.QGOFTConfig(target_modules=["lin0"], reg_lambda=1.0), "a")
    peft_model.add_adapter("b", orthoft.QGOFTConfig(target_modules=["lin0"], reg_lambda=1.0))
    layer = qgoft_layers(peft_model)[0]
    with torch.no_grad():
        layer.orthoft_qgoft_blocks["b"][:, 0, 1] = 1.0  # column inner product 1 per pair
    assert orthoft.regularization_loss(peft_model).item() == 0.0  # only "a" is active
    peft_model.base_model.set_adapter(["a", "b"])
    assert orthoft.regularization_loss(peft_model).item() == pytest.approx(63.0)
    with peft_model.disable_adapter():
        assert orthoft.regularization_loss(peft_model).item() == 0.0


def test_regularization_loss_is_zero_without_adapters():
    loss = orthoft.regularization_loss(nn.Linear(4, 4))
    assert loss.ndim == 0 and loss.item() == 0.0 and not loss.requires_grad


def test_config_errors():
    with pytest.raises(ValueError, match="layout"):
        orthoft.QGOFTConfig(layout="spiral")
    with pytest.raises(ValueError, match="reg_lambda"):
        orthoft.QGOFTConfig(reg_lambda=-1.0)
    with pytest.raises(ValueError, match="num_layers"):
        orthoft.QGOFTConfig(num_layers=0)


def test_optimizer_views_route_blocks_and_angles():
    views = orthoft.adapters.QGOFTLayer.optimizer_views
    assert views == {"orthoft_qgoft_blocks": "matrix_stack", "orthoft_qgoft_angles": "vector"}
