"""The optimizers: parity with torch.optim.Muon, state_dict, AdamW fallback, weight decay, scaling."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_optim_helpers import single_thread  # noqa: F401  (autouse fixture)

from orthoft.optim import ROOT, AuON, HybridAuON, Muon, NorMuon, TurboMuon
from orthoft.optim.optimizers import cosh_brake, spectral_norm_estimate, update_scale_factor
from orthoft.orthogonal.skew import unpack_skew, upper_entries

ALL_OPTIMIZERS = [Muon, NorMuon, TurboMuon, ROOT, AuON, HybridAuON]


def _run(optimizer_factory, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    optimizer = optimizer_factory(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def test_matches_torch_muon_within_two_percent() -> None:
    shapes = [(32, 64), (64, 32), (48, 48)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    reference = [torch.nn.Parameter(t.clone()) for t in start]
    _run(lambda ps: Muon(ps, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0, ns_dtype=torch.bfloat16),
         ours, grads)
    _run(lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0,
                                     adjust_lr_fn="original"), reference, grads)
    for p_ours, p_ref, p0 in zip(ours, reference, start):
        change_ours, change_ref = p_ours.detach() - p0, p_ref.detach() - p0
        relative = (change_ours - change_ref).norm() / change_ref.norm()
        assert relative <= 0.02, f"{tuple(p0.shape)}: {relative:.4f}"


@pytest.mark.parametrize("optimizer_class", ALL_OPTIMIZERS)
def test_state_dict_restore_gives_identical_next_steps(optimizer_class: type) -> None:
    params = [torch.nn.Parameter(torch.randn(12, 20)), torch.nn.Parameter(torch.randn(20))]
    skew = torch.nn.Parameter(torch.randn(3, 10))
    groups = [{"params": params}, {"params": [skew], "view": "skew_packed"}]
    all_params = [*params, skew]
    optimizer = optimizer_class(groups, lr=0.01, weight_decay=0.1)
    grads = [[torch.randn_like(p) for p in all_params] for _ in range(4)]

    def apply(optimizer, ps, step_grads):
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        optimizer.step()

    for step_grads in grads[:2]:
        apply(optimizer, all_params, step_grads)
    saved_params = [p.detach().clone() for p in all_params]
    buffer = __import__("io").BytesIO()
    torch.save(optimizer.state_dict(), buffer)

    for step_grads in grads[2:]:
        apply(optimizer, all_params, step_grads)
    expected = [p.detach().clone() for p in all_params]

    restored_params = [torch.nn.Parameter(t.clone()) for t in saved_params]
    restored_groups = [{"params": restored_params[:2]}, {"params": restored_params[2:], "view": "skew_packed"}]
    restored = optimizer_class(restored_groups, lr=0.5)  # hyperparameters come back from the state_dict
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.param_groups[0]["lr"] == 0.01
    for step_grads in grads[2:]:
        apply(restored, restored_params, step_grads)
    for p, e in zip(restored_params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)


def test_vectors_use_adamw_identical_to_torch() -> None:
    start = torch.randn(10)
    ours, reference = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizer = Muon([ours], lr=1e-2, weight_decay=0.1, adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    torch_adamw = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        g = torch.randn(10)
        ours.grad, reference.grad = g.clone(), g.clone()
        optimizer.step()
        torch_adamw.step()
    torch.testing.assert_close(ours.detach(), reference.detach())
    assert "exp_avg" in optimizer.state[ours] and "momentum_buffer" not in optimizer.state[ours]


def test_use_muon_false_and_vector_view_route_matrices_to_adamw() -> None:
    a, b = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(4, 6))
    optimizer = Muon([{"params": [a], "use_muon": False}, {"params": [b], "view": "vector"}], lr=1e-3)
    a.grad, b.grad = torch.randn(4, 6), torch.randn(4, 6)
    optimizer.step()
    assert "exp_avg" in optimizer.state[a] and "exp_avg" in optimizer.state[b]


@pytest.mark.parametrize("optimizer_class", ALL_OPTIMIZERS)
def test_weight_decay_is_decoupled(optimizer_class: type) -> None:
    """With a zero gradient only the decay acts, and it is exactly p (1 - lr wd), on both paths."""
    matrix, vector = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))
    start = [matrix.detach().clone(), vector.detach().clone()]
    optimizer = optimizer_class([matrix, vector], lr=0.05, weight_decay=0.2)
    matrix.grad, vector.grad = torch.zeros(8, 8), torch.zeros(8)
    optimizer.step()
    torch.testing.assert_close(matrix.detach(), start[0] * (1 - 0.05 * 0.2))
    torch.testing.assert_close(vector.detach(), start[1] * (1 - 0.05 * 0.2))


def test_update_scaling_rules_and_transposition() -> None:
    assert update_scale_factor("original", 64, 16) == pytest.approx(2.0)
    assert update_scale_factor("original", 16, 64) == pytest.approx(1.0)
    assert update_scale_factor("match_rms_adamw", 16, 64) == pytest.approx(0.2 * 8)
    with pytest.raises(ValueError, match="use one of"):
        update_scale_factor("rms", 2, 2)
    # A tall parameter's update is the transposed wide one, scaled by sqrt(rows/cols).
    grad = torch.randn(16, 64)
    wide, tall = torch.nn.Parameter(torch.zeros(16, 64)), torch.nn.Parameter(torch.zeros(64, 16))
    wide.grad, tall.grad = grad.clone(), grad.T.clone()
    Muon([wide, tall], lr=1.0, momentum=0.0, nesterov=False).step()
    torch.testing.assert_close(tall.detach(), 2.0 * wide.detach().T)


@pytest.mark.parametrize("optimizer_class", ALL_OPTIMIZERS)
def test_every_variant_descends_on_a_least_squares_problem(optimizer_class: type) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs, target_weight = torch.randn(64, 16, generator=generator), 0.2 * torch.randn(8, 16, generator=generator)
    targets = inputs @ target_weight.T
    weight = torch.nn.Parameter(torch.zeros(8, 16))
    bias = torch.nn.Parameter(torch.zeros(8))
    lr = 0.05
    optimizer = optimizer_class([weight, bias], lr=lr)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = ((inputs @ weight.T + bias - targets) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.5 * losses[0]


def test_normuon_balances_rows_and_keeps_skew_blocks_skew() -> None:
    grad = torch.randn(6, 32) * torch.tensor([10.0, 1, 1, 1, 1, 0.1]).unsqueeze(1)
    p = torch.nn.Parameter(torch.zeros(6, 32))
    p.grad = grad
    NorMuon([p], lr=1.0, momentum=0.0, nesterov=False).step()
    row_norms = p.detach().norm(dim=1)
    assert row_norms.max() / row_norms.min() < 1.05
    skew = torch.nn.Parameter(torch.zeros(2, 28))
    skew.grad = torch.randn(2, 28)
    optimizer = NorMuon([{"params": [skew], "view": "skew_packed"}], lr=0.1)
    optimizer.step()
    assert optimizer.state[skew]["row_second_moment"].shape == (2, 8)
    assert torch.isfinite(skew).all()


def test_root_clips_outliers_before_orthogonalizing() -> None:
    """One huge entry turns Muon's direction into a rank-1 spike; ROOT clips it to the 90th percentile.

    The matrix is wide so that its polar factor is well conditioned.
    """
    grad = torch.randn(16, 64)
    spiked = grad.clone()
    spiked[3, 5] = 1e6

    def update(optimizer_class: type, g: torch.Tensor) -> torch.Tensor:
        p = torch.nn.Parameter(torch.zeros(16, 64))
        p.grad = g.clone()
        optimizer_class([p], lr=1.0, momentum=0.0, nesterov=False, update_scale="none").step()
        return p.detach()

    def shift(optimizer_class: type) -> float:
        clean = update(optimizer_class, grad)
        return float((clean - update(optimizer_class, spiked)).norm() / clean.norm())

    root_shift, muon_shift = shift(ROOT), shift(Muon)
    assert muon_shift > 0.8, muon_shift
    assert root_shift < 0.5 * muon_shift, (root_shift, muon_shift)


def test_auon_direction_is_scale_free_and_linear_time() -> None:
    g = torch.randn(3, 8, 24)
    direction = cosh_brake(g, gamma=1.5, eps=1e-7)
    torch.testing.assert_close(direction, cosh_brake(1000 * g, gamma=1.5, eps=1e-7))
    norms = direction.norm(dim=(-2, -1))
    assert ((norms <= math.sqrt(8)) & (norms > 0.9 * math.sqrt(8))).all()


def test_spectral_norm_estimate_is_exact_on_low_rank_and_tight_on_full_rank() -> None:
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(16, 32, 2, generator=generator)
    skew = u[..., :1] @ u[..., 1:].transpose(-2, -1)
    skew = skew - skew.transpose(-2, -1)  # rank 2, as a skew block's momentum often is
    sigma, _ = spectral_norm_estimate(skew)
    torch.testing.assert_close(sigma.flatten(), torch.linalg.matrix_norm(skew, ord=2), rtol=1e-4, atol=0)
    gaussian = torch.randn(16, 32, 32, generator=generator)
    sigma, vector = spectral_norm_estimate(gaussian)
    sigma, _ = spectral_norm_estimate(gaussian, vector)  # warm start, as AuON keeps it in its state
    ratio = sigma.flatten() / torch.linalg.matrix_norm(gaussian, ord=2)
    assert (ratio <= 1 + 1e-5).all() and ratio.median() > 0.95, ratio


def test_auon_steps_inside_muons_trust_region() -> None:
    """On a rank-1 momentum AuON's step is the polar factor ``u v^T``; on a rank-2 skew block its spectral norm is 1.

    Before the trust-region bound both were ``sqrt(min(m, n) / rank)`` times larger (4x on the 32x32 block)."""
    generator = torch.Generator().manual_seed(0)

    def step(optimizer_class: type, grad: torch.Tensor, **kwargs) -> torch.Tensor:
        p = torch.nn.Parameter(torch.zeros_like(grad))
        p.grad = grad.clone()
        optimizer_class([{"params": [p], **kwargs}], lr=1.0, momentum=0.0, nesterov=False).step()
        return p.detach()

    rank1 = torch.randn(24, 1, generator=generator) @ torch.randn(1, 16, generator=generator)
    polar = rank1 / torch.linalg.matrix_norm(rank1, ord=2)
    scale = math.sqrt(24 / 16)  # the "original" update scaling of a 24 x 16 matrix
    torch.testing.assert_close(step(AuON, rank1), -scale * polar, rtol=1e-3, atol=1e-5)
    u = torch.randn(32, 2, generator=generator)
    block = u[:, :1] @ u[:, 1:].T
    packed = upper_entries((block - block.T).unsqueeze(0))  # one 32x32 skew block, rank 2
    moved = unpack_skew(step(AuON, packed, view="skew_packed"), 32)
    assert torch.linalg.matrix_norm(moved, ord=2).item() == pytest.approx(1.0, rel=1e-3)


def test_hybrid_auon_uses_one_newton_schulz_step_by_default() -> None:
    optimizer = HybridAuON([torch.nn.Parameter(torch.zeros(4, 4))])
    assert optimizer.param_groups[0]["ns_steps"] == 1


def test_variant_defaults_and_explicit_overrides() -> None:
    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    turbo = TurboMuon(p).param_groups[0]
    assert (turbo["ns_method"], turbo["ns_steps"], turbo["lr"]) == ("turbo", 4, 0.02)
    root = ROOT(p).param_groups[0]
    assert (root["ns_method"], root["ns_dtype"], root["update_scale"]) == ("root", "float32", "match_rms_adamw")
    assert Muon(p, ns_dtype=torch.bfloat16, ns_method="polar_express").param_groups[0]["ns_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="ns_method must be one of"):
        Muon(p, ns_method="svd")
    with pytest.raises(ValueError, match="update_scale must be one of"):
        Muon(p, update_scale="rms")
    with pytest.raises(ValueError, match="view must be one of"):
        Muon([{"params": p, "view": "diag"}])
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*b\(b-1\)/2"):
        Muon([{"params": p, "view": "skew_packed"}])


def test_sharded_dtensor_parameters_are_rejected(tmp_path) -> None:
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(0)]))
        with pytest.raises(NotImplementedError, match="DTensor.*does not gather shards"):
            Muon([sharded])
    finally:
        dist.destroy_process_group()


def test_deepcopy_and_zero_grad_none_are_harmless() -> None:
    p = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = Muon([p])
    optimizer.step()  # no grads yet: nothing happens
    copy.deepcopy(optimizer)
