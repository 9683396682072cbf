"""HRA: Householder chains in WY form, the Gram-Schmidt variant, odd r, the regularizer and parity with PEFT."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft import get_peft_model
from torch import nn

import orthoft
from orthoft.orthogonal import (
    apply_householder,
    apply_householder_sequential,
    apply_subspace_reflection,
    householder_matrix,
    normalized_gram_penalty,
    orthonormal_basis,
)
from tests.helpers import make_model, perturb_adapters

F64 = torch.float64


def reflection(u: torch.Tensor) -> torch.Tensor:
    return torch.eye(len(u), dtype=u.dtype) - 2 * torch.outer(u, u) / u.dot(u)


@pytest.mark.parametrize("r", [1, 2, 5, 8])
def test_wy_and_sequential_match_the_product_of_reflections(r):
    d = 24
    u = torch.randn(d, r, dtype=F64) * torch.rand(r, dtype=F64)  # unequal column norms
    expected = torch.eye(d, dtype=F64)
    for i in range(r):
        expected = expected @ reflection(u[:, i])  # H = H_1 H_2 ... H_r
    assert torch.allclose(householder_matrix(u), expected, atol=1e-12)
    x = torch.randn(3, 5, d, dtype=F64)
    for apply in (apply_householder, apply_householder_sequential):
        assert torch.allclose(apply(x, u), x @ expected.T, atol=1e-12)
        assert torch.allclose(apply(x, u, transpose=True), x @ expected, atol=1e-12)


@pytest.mark.parametrize("r", [1, 3, 8, 16])
def test_chain_is_orthogonal_with_determinant_minus_one_to_the_r(r):
    h = householder_matrix(torch.randn(16, r, dtype=F64))
    assert torch.allclose(h.T @ h, torch.eye(16, dtype=F64), atol=1e-12)
    assert torch.linalg.det(h).item() == pytest.approx((-1) ** r)


def test_paired_columns_give_the_identity():
    half = torch.randn(32, 4)
    u = torch.repeat_interleave(half, 2, dim=1)
    assert torch.allclose(householder_matrix(u), torch.eye(32), atol=1e-6)


def test_gram_schmidt_basis_and_subspace_reflection():
    u = torch.randn(20, 5, dtype=F64)
    q = orthonormal_basis(u)
    assert torch.allclose(q.T @ q, torch.eye(5, dtype=F64), atol=1e-12)
    assert torch.allclose(q @ q.T @ u, u, atol=1e-12), "Q must span the columns of U"
    x = torch.randn(4, 20, dtype=F64)
    assert torch.allclose(apply_subspace_reflection(x, q), x @ (torch.eye(20, dtype=F64) - 2 * q @ q.T))
    with pytest.raises(ValueError, match="Fix"):
        orthonormal_basis(torch.randn(3, 4))


def test_shape_errors_name_the_expected_shape():
    with pytest.raises(ValueError, match=r"expected \(8, r\)"):
        apply_householder(torch.randn(2, 8), torch.randn(6, 2))


def test_normalized_gram_penalty_values_and_finite_gradient_at_zero():
    u = torch.randn(10, 4, dtype=F64)
    unit = u / u.norm(dim=0)
    expected = torch.linalg.matrix_norm(torch.eye(4, dtype=F64) - unit.T @ unit)
    assert normalized_gram_penalty(u).item() == pytest.approx(expected.item(), rel=1e-10)
    orthogonal = (torch.eye(10)[:, :4] * torch.tensor([1.0, 2.0, 3.0, 4.0])).requires_grad_(True)
    value = normalized_gram_penalty(orthogonal)
    assert value.item() == pytest.approx(0.0, abs=1e-15)
    value.backward()
    assert torch.isfinite(orthogonal.grad).all()


# ---- adapter ---------------------------------------------------------------------------


def hra_layers(model):
    return [m for m in model.modules() if isinstance(m, orthoft.adapters.HRALayer)]


def test_defaults_and_paired_identity_init():
    config = orthoft.HRAConfig(target_modules=["lin0", "lin1"])
    assert config.r == 8 and not config.apply_GS and config.peft_type == "ORTHOFT_HRA"
    model, x, _ = make_model("linear")
    reference = copy.deepcopy(model)
    peft_model = get_peft_model(model, config)
    for layer in hra_layers(peft_model):
        u = layer.orthoft_hra_U["default"]
        assert u.shape == (layer.in_features, 8)
        assert torch.equal(u[:, 0::2], u[:, 1::2])
    assert torch.allclose(peft_model(x), reference(x), atol=1e-6)


@pytest.mark.parametrize("r", [1, 7])
def test_odd_r_with_identity_init_is_a_clear_error(r):
    with pytest.raises(ValueError, match=f"r={r} is odd.*determinant -1.*Fix: use an even r"):
        orthoft.HRAConfig(r=r, target_modules=["lin0"])


def test_odd_r_is_allowed_for_random_init_and_is_not_the_identity():
    model, x, _ = make_model("linear")
    reference = copy.deepcopy(model)
    peft_model = get_peft_model(model, orthoft.HRAConfig(r=3, init_weights=False, target_modules=["lin0"]))
    layer = hra_layers(peft_model)[0]
    with torch.no_grad():
        dense = layer.transform_input("default", torch.eye(64))
    assert torch.linalg.det(dense.double()).item() == pytest.approx(-1.0, abs=1e-4)
    assert (peft_model(x) - reference(x)).abs().max() > 1e-3


def test_r_larger_than_in_features_is_a_clear_error():
    model, _, targets = make_model("conv2d")  # conv3 has 16 input features
    with pytest.raises(ValueError, match="r=18 .* 16 input features.*Fix"):
        get_peft_model(model, orthoft.HRAConfig(r=18, target_modules=targets))


def test_gram_schmidt_variant_starts_at_identity_and_stays_orthogonal():
    model, x, targets = make_model("conv2d")
    reference = copy.deepcopy(model)
    peft_model = get_peft_model(model, orthoft.HRAConfig(r=6, apply_GS=True, target_modules=targets))
    assert torch.allclose(peft_model(x), reference(x), atol=1e-5)
    perturb_adapters(peft_model, 0.5)
    for layer in hra_layers(peft_model):
        eye = torch.eye(layer.in_features)
        u = layer.orthoft_hra_U["default"].detach().double()
        qa, qb = orthonormal_basis(u[:, 0::2]), orthonormal_basis(u[:, 1::2])
        eye64 = eye.double()
        expected = (eye64 - 2 * qa @ qa.T) @ (eye64 - 2 * qb @ qb.T)
        with torch.no_grad():
            dense = layer.transform_input("default", eye).T  # rows mapped by H: eye @ H^T
        assert torch.allclose(dense.double(), expected, atol=1e-5)
        assert torch.allclose(dense.T @ dense, eye, atol=1e-5)
        assert layer.regularization_loss("default") is None


def test_regularization_loss_value_at_init_and_after_training_step():
    model, x, _ = make_model("linear")
    peft_model = get_peft_model(model, orthoft.HRAConfig(r=8, reg_lambda=1e-3, target_modules=["lin0", "lin1"]))
    layers = hra_layers(peft_model)
    expected = sum(1e-3 * normalized_gram_penalty(layer.orthoft_hra_U["default"]) for layer in layers)
    loss = orthoft.regularization_loss(peft_model)
    assert loss.ndim == 0 and torch.allclose(loss, expected)
    # the paired init is the identity but not orthogonal vectors: each pair adds two off-diagonal 1s
    for layer in layers:
        assert layer.regularization_loss("default").item() >= 1e-3 * 8**0.5 - 1e-9
    (peft_model(x).square().mean() + loss).backward()
    for layer in layers:
        assert torch.isfinite(layer.orthoft_hra_U["default"].grad).all()


def test_regularization_loss_off_with_zero_lambda():
    model, _, _ = make_model("linear")
    peft_model = get_peft_model(model, orthoft.HRAConfig(r=4, reg_lambda=0.0, target_modules=["lin0"]))
    assert hra_layers(peft_model)[0].regularization_loss("default") is None
    assert orthoft.regularization_loss(peft_model).item() == 0.0


def test_bfloat16_model_runs():
    model, x, _ = make_model("linear")
    peft_model = get_peft_model(model.to(torch.bfloat16), orthoft.HRAConfig(r=4, target_modules=["lin0", "lin1"]))
    out = peft_model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert hra_layers(peft_model)[0].orthoft_hra_U["default"].dtype == torch.float32


# ---- parity with PEFT's HRA ------------------------------------------------------------
#
# Mapping: PEFT's hra_u[:, i] is our U[:, i], same order, no transpose, no normalization
# (both use u_i / |u_i|). PEFT's effective weight is W @ (H_0 H_1 ... H_{r-1}); ours is W H with
# H = H_1 ... H_r, i.e. the same matrix. PEFT's apply_GS (I - 2 QQ^T over all columns) equals our
# orthoft.orthogonal.apply_subspace_reflection(x, orthonormal_basis(U)); the adapter's apply_GS
# is the paired form instead (see HRAConfig), because PEFT's cannot start at the identity.


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(48, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def peft_and_ours(module_cls, target: str, r: int):
    torch.manual_seed(0)
    base = module_cls()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), peft.HRAConfig(r=r, target_modules=[target]))
    ours = get_peft_model(copy.deepcopy(base), orthoft.HRAConfig(r=r, target_modules=[target]))
    their_u = next(p for n, p in theirs.named_parameters() if "hra_u" in n)
    with torch.no_grad():
        their_u.add_(torch.randn_like(their_u) * 0.3)  # leave the identity so parity means something
        hra_layers(ours)[0].orthoft_hra_U["default"].copy_(their_u)
    return theirs, ours


@pytest.mark.parametrize("r", [2, 8])
def test_parity_with_peft_hra_on_linear(r):
    theirs, ours = peft_and_ours(OneLinear, "lin", r)
    x = torch.randn(3, 7, 48)
    expected = theirs(x)
    assert (expected - theirs.get_base_model().lin.base_layer(x)).abs().max() > 1e-2
    assert torch.allclose(ours(x), expected, atol=1e-5)
    merged_theirs = theirs.merge_and_unload().lin.weight
    merged_ours = ours.merge_and_unload().lin.weight
    assert torch.allclose(merged_ours, merged_theirs, atol=1e-5)


def test_parity_with_peft_hra_on_square_conv2d():
    # PEFT's HRA Conv2d is only right for square kernels, equal strides/paddings and no dilation
    theirs, ours = peft_and_ours(OneConv, "conv", 8)
    x = torch.randn(2, 4, 9, 7)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_parity_with_peft_gram_schmidt_math():
    theirs, _ = peft_and_ours(OneLinear, "lin", 6)
    layer = next(m for m in theirs.modules() if isinstance(m, peft.tuners.hra.HRALinear))
    layer.hra_apply_GS["default"] = True
    their_h = layer.get_delta_weight("default")  # effective weight W @ their_h
    u = layer.hra_u["default"].detach()
    ours_h = apply_subspace_reflection(torch.eye(48), orthonormal_basis(u))
    assert torch.allclose(ours_h, their_h, atol=1e-5)
