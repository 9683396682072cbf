"""The pure math in orthoft.orthogonal: packing, Cayley maps, block and butterfly rotations."""

import pytest
import torch

from orthoft.orthogonal import (
    apply_butterfly,
    block_diagonal,
    block_size_from_packed,
    bound_skew_norm,
    butterfly_dense,
    butterfly_permutation,
    cayley_exact,
    cayley_neumann,
    drop_blocks,
    orthogonality_error,
    pack_skew,
    packed_size,
    rotate_blocks,
    rotation_from_packed,
    unpack_skew,
)


def random_skew(*shape, scale=0.1):
    a = torch.randn(*shape) * scale
    return a - a.transpose(-1, -2)


@pytest.mark.parametrize("b", [2, 3, 8, 32])
def test_pack_unpack_round_trip(b):
    packed = torch.randn(5, packed_size(b))
    q = unpack_skew(packed)
    assert q.shape == (5, b, b)
    assert torch.equal(q, -q.transpose(-1, -2))
    assert torch.equal(pack_skew(q), packed)
    assert block_size_from_packed(packed_size(b)) == b


def test_packing_order_is_peft_triu_order():
    b = 4
    packed = torch.arange(1.0, packed_size(b) + 1)
    q = unpack_skew(packed)
    rows, cols = torch.triu_indices(b, b, 1)
    assert torch.equal(q[rows, cols], packed)


def test_block_size_from_bad_length():
    with pytest.raises(ValueError, match="not b\\(b-1\\)/2"):
        block_size_from_packed(7)


@pytest.mark.parametrize("scale", [0.01, 0.3, 2.0])
def test_exact_cayley_is_orthogonal(scale):
    q = random_skew(16, 32, 32, scale=scale)
    assert orthogonality_error(cayley_exact(q)) < 1e-5


def test_exact_cayley_sign_convention():
    q = random_skew(1, 6, 6)
    eye = torch.eye(6)
    expected = (eye + q[0]) @ torch.linalg.inv(eye - q[0])
    assert torch.allclose(cayley_exact(q)[0], expected, atol=1e-6)


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4, 5, 6])
def test_neumann_matches_closed_form_error(degree):
    # R^T R = (I - (-Q)^(k+1)) (I - Q^(k+1)) exactly, for every degree k
    q = random_skew(4, 8, 8, scale=0.05).double()
    r = cayley_neumann(q.float(), degree).double()
    eye = torch.eye(8, dtype=torch.float64)
    p = torch.linalg.matrix_power(q, degree + 1)
    pm = torch.linalg.matrix_power(-q, degree + 1)
    assert torch.allclose(r.transpose(-1, -2) @ r, (eye - pm) @ (eye - p), atol=1e-5)


def test_even_degree_beats_odd_degree():
    q = random_skew(8, 16, 16, scale=0.05)
    err3 = orthogonality_error(cayley_neumann(q, 3))
    err4 = orthogonality_error(cayley_neumann(q, 4))
    assert err4 < err3 / 10


def test_neumann_orthogonality_bound_at_default():
    # |Q|_F <= 0.3: error <= |Q|^10 for degree 4, far under 1e-4
    q = bound_skew_norm(random_skew(16, 32, 32, scale=1.0), 0.3)
    assert orthogonality_error(cayley_neumann(q, 4)) < 1e-4


@pytest.mark.parametrize("degree", [3, 4, 6])
def test_cayley_and_neumann_agree_for_small_q(degree):
    q = random_skew(8, 16, 16, scale=0.005)
    assert (cayley_exact(q) - cayley_neumann(q, degree)).abs().max() < 1e-5


def test_switching_map_never_flips_rotation():
    q = random_skew(4, 8, 8, scale=0.02)
    exact, approx = cayley_exact(q), cayley_neumann(q, 4)
    flipped = exact.transpose(-1, -2)
    assert (exact - approx).abs().max() < (flipped - approx).abs().max() / 100


def test_bound_skew_norm_keeps_small_and_rescales_large():
    small = random_skew(2, 4, 4, scale=0.01)
    assert torch.equal(bound_skew_norm(small, 0.9), small)
    big = random_skew(2, 4, 4, scale=10.0)
    bounded = bound_skew_norm(big, 0.9)
    norms = torch.linalg.matrix_norm(bounded)
    assert torch.allclose(norms, torch.full_like(norms, 0.9), atol=1e-5)
    assert bound_skew_norm(big, None) is big


def test_neumann_with_bound_stays_bounded_for_huge_q():
    packed = torch.randn(4, packed_size(16)) * 100
    r = rotation_from_packed(packed)
    assert torch.isfinite(r).all()
    assert orthogonality_error(r) < 0.5
    unbounded = rotation_from_packed(packed, max_norm=None)
    assert orthogonality_error(unbounded) > 1e3


def test_rotation_from_packed_is_float32_for_bf16_input():
    packed = (torch.randn(3, packed_size(8)) * 0.01).bfloat16()
    assert rotation_from_packed(packed).dtype == torch.float32


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_rotate_blocks_matches_dense(shared, transpose):
    n, b = 6, 4
    rot = cayley_exact(random_skew(1 if shared else n, b, b, scale=0.5))
    x = torch.randn(3, 5, n * b)
    dense = block_diagonal(rot, n)
    expected = x @ (dense.T if transpose else dense)
    assert torch.allclose(rotate_blocks(x, rot, transpose), expected, atol=1e-5)


def test_drop_blocks():
    rot = cayley_exact(random_skew(2000, 4, 4, scale=0.5))
    assert drop_blocks(rot, 0.5, training=False) is rot
    dropped = drop_blocks(rot, 0.5, training=True)
    is_eye = (dropped - torch.eye(4)).abs().amax((-1, -2)) == 0
    assert 0.4 < is_eye.float().mean() < 0.6
    assert torch.equal(dropped[~is_eye], rot[~is_eye])


def peft_block_butterfly_perm(n, b, r, n_butterfly_factor):
    """PEFT 0.21 BOFTLayer.block_butterfly_perm, re-derived independently for the comparison."""
    from peft.tuners.boft.layer import BOFTLayer

    return BOFTLayer.block_butterfly_perm(None, n, b, r, n_butterfly_factor)


@pytest.mark.parametrize("d,b,m", [(64, 8, 2), (64, 4, 3), (96, 8, 2), (128, 2, 4)])
def test_butterfly_permutation_matches_peft(d, b, m):
    for factor in range(m):
        peft_perm = peft_block_butterfly_perm(d, d // b // 2**factor, b // 2, m - 1)
        assert torch.equal(butterfly_permutation(d, b, factor), peft_perm)


@pytest.mark.parametrize("d,b,m", [(32, 4, 3), (64, 8, 2), (48, 6, 2)])
def test_apply_butterfly_matches_dense_product(d, b, m):
    rot = cayley_exact(random_skew(m, d // b, b, b, scale=0.5))
    dense = torch.eye(d)
    for factor in range(m):
        perm = butterfly_permutation(d, b, factor)
        p = torch.eye(d)[perm]  # (P v)[k] = v[perm[k]]
        dense = p @ block_diagonal(rot[factor]) @ p.T @ dense
    x = torch.randn(7, d)
    assert torch.allclose(apply_butterfly(x, rot), x @ dense, atol=1e-5)
    assert torch.allclose(apply_butterfly(x, rot, transpose=True), x @ dense.T, atol=1e-5)
    assert torch.allclose(butterfly_dense(rot, d), dense, atol=1e-5)
    assert orthogonality_error(dense) < 1e-5


@pytest.mark.parametrize("d,b,m", [(32, 8, 2), (48, 6, 2), (32, 4, 3), (64, 4, 4), (64, 2, 5)])
@pytest.mark.parametrize("transpose", [False, True])
def test_apply_butterfly_gradients_match_dense_product(d, b, m, transpose):
    # m <= 4 runs on the dense chunks, m = 5 on the factored chain: both must give the dense product's gradients
    skew = random_skew(m, d // b, b, b, scale=0.5).double().requires_grad_(True)
    x = torch.randn(5, d, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, d, dtype=torch.float64)
    rot = cayley_exact(skew)
    loss = (apply_butterfly(x, rot, transpose) * upstream).sum()
    grads = torch.autograd.grad(loss, (x, skew), retain_graph=True)
    dense = torch.eye(d, dtype=torch.float64)
    for factor in range(m):
        p = torch.eye(d, dtype=torch.float64)[butterfly_permutation(d, b, factor)]
        dense = p @ block_diagonal(rot[factor]) @ p.T @ dense
    reference = x @ (dense.T if transpose else dense)
    expected = torch.autograd.grad((reference * upstream).sum(), (x, skew))
    assert torch.allclose(grads[0], expected[0], atol=1e-10)
    assert torch.allclose(grads[1], expected[1], atol=1e-10)


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("max_norm", [None, 0.9])
def test_fused_neumann_gradient_matches_plain_autograd(degree, max_norm):
    # the fused build works in P = Q^2 with symmetric shortcuts; the plain series is the reference
    packed = (torch.randn(3, packed_size(8), dtype=torch.float64) * 0.3).requires_grad_(True)
    upstream = torch.randn(3, 8, 8, dtype=torch.float64)
    fused = rotation_from_packed(packed, neumann_degree=degree, max_norm=max_norm)
    (grad,) = torch.autograd.grad((fused * upstream).sum(), packed)
    plain = cayley_neumann(bound_skew_norm(unpack_skew(packed), max_norm), degree)
    (expected,) = torch.autograd.grad((plain * upstream).sum(), packed)
    assert torch.allclose(fused, plain, atol=1e-13)
    assert torch.allclose(grad, expected, atol=1e-12)


def test_butterfly_mixes_wider_span_than_one_block():
    d, b, m = 32, 4, 3
    rot = cayley_exact(random_skew(m, d // b, b, b, scale=0.5))
    dense = butterfly_dense(rot, d)
    # m factors reach b * 2^(m-1) = 16 coordinates: blocks of 16 are full, nothing leaks across
    assert (dense[:16, :16].abs() > 0).float().mean() > 0.9
    assert dense[:16, 16:].abs().max() < 1e-7


def test_packing_first_used_in_inference_mode_still_trains():
    b = 11  # a size no other test touched, so the index cache is filled under inference_mode
    with torch.inference_mode():
        unpack_skew(torch.randn(2, packed_size(b)))
    packed = torch.randn(2, packed_size(b), requires_grad=True)
    cayley_neumann(unpack_skew(packed)).sum().backward()
    assert packed.grad is not None
