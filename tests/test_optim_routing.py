"""build_optimizer: routing by ``optimizer_views``, the AdamW fallback, PEFT OFT and Accelerate."""

from __future__ import annotations

import math

import pytest
import torch
from test_optim_helpers import FakeAdapterLayer, TinyModel, single_thread, train_steps  # noqa: F401
from torch import nn

import orthoft
from orthoft.optim import ROOT, Muon, NorMuon, build_optimizer, route_parameters


def _views_by_name(model: nn.Module, **kwargs) -> dict[str, str]:
    return {route.name: route.view for route in route_parameters(model, **kwargs)}


def test_declared_views_are_routed_and_everything_else_falls_back() -> None:
    views = _views_by_name(TinyModel())
    assert views == {
        "embed.weight": "vector",
        "layer.fake_Q.default": "skew_packed",
        "layer.fake_U.default": "matrix",
        "layer.fake_stack.default": "matrix_stack",
        "layer.fake_s.default": "vector",
        "hidden.weight": "vector",
        "hidden.bias": "vector",
        "norm.weight": "vector",
        "norm.bias": "vector",
        "classifier.weight": "vector",
        "classifier.bias": "vector",
    }  # the frozen base Linear and the frozen second adapter are not listed


def test_muon_for_plain_matrices_keeps_embeddings_and_heads_on_adamw() -> None:
    views = _views_by_name(TinyModel(), muon_for_plain_matrices=True)
    assert views["hidden.weight"] == "matrix"
    assert views["embed.weight"] == views["classifier.weight"] == views["hidden.bias"] == "vector"


def test_build_optimizer_groups_are_plain_data() -> None:
    model = TinyModel()
    optimizer = build_optimizer(model, "muon", lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.0, weight_decay=0.1)
    assert isinstance(optimizer, Muon)
    by_view = {g["view"]: g for g in optimizer.param_groups}
    assert set(by_view) == {"skew_packed", "matrix", "matrix_stack", "vector"}
    assert by_view["vector"]["use_muon"] is False
    assert (by_view["vector"]["lr"], by_view["vector"]["weight_decay"]) == (1e-3, 0.0)
    assert (by_view["matrix"]["lr"], by_view["matrix"]["weight_decay"]) == (0.02, 0.1)
    for group in optimizer.state_dict()["param_groups"]:
        assert all(isinstance(v, (int, float, str, bool, tuple, list, type(None))) for v in group.values())


@pytest.mark.parametrize("name", ["muon", "NorMuon", "turbo_muon", "root", "auon", "hybrid-auon", "adamw"])
def test_every_optimizer_trains_the_fake_adapter(name: str) -> None:
    model = TinyModel()
    frozen_base = model.layer.base.weight.detach().clone()
    frozen_adapter = model.layer.fake_Q["frozen"].detach().clone()
    q_start = model.layer.fake_Q["default"].detach().clone()
    optimizer = build_optimizer(model, name, lr=1e-2, adamw_lr=1e-2)
    losses = train_steps(model, optimizer, steps=25)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert not torch.equal(model.layer.fake_Q["default"].detach(), q_start)
    assert torch.equal(model.layer.base.weight.detach(), frozen_base)
    assert torch.equal(model.layer.fake_Q["frozen"].detach(), frozen_adapter)


def test_build_optimizer_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="Unknown optimizer 'lion'"):
        build_optimizer(TinyModel(), "lion", lr=1e-3)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), "muon", lr=1e-3)

    class BadLayer(nn.Module):
        optimizer_views = {"missing": "matrix"}

    with pytest.raises(TypeError, match="BadLayer.*'missing'.*ParameterDict"):
        build_optimizer(BadLayer(), "muon", lr=1e-3)

    class WrongShape(nn.Module):
        optimizer_views = {"q": "skew_packed"}

        def __init__(self) -> None:
            super().__init__()
            self.q = nn.ParameterDict({"default": nn.Parameter(torch.zeros(2, 7))})

    with pytest.raises(ValueError, match=r"q\.default.*b\(b-1\)/2"):
        build_optimizer(WrongShape(), "muon", lr=1e-3)


def test_shared_fake_adapter_instances_do_not_duplicate_params() -> None:
    layer = FakeAdapterLayer(nn.Linear(8, 8))
    model = nn.Sequential(layer, layer)
    routes = route_parameters(model)
    assert len(routes) == len({id(r.param) for r in routes}) == 4


@pytest.mark.skipif(not hasattr(orthoft, "OFTConfig"), reason="orthoft.OFTConfig has not landed yet")
def test_peft_oft_q_routes_to_skew_packed_and_a_step_moves_it() -> None:
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(32, 32)
            self.out = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.proj(x)))

    model = peft.get_peft_model(Net(), orthoft.OFTConfig(target_modules=["proj"], block_size=8))
    routes = {r.name: r.view for r in route_parameters(model)}
    q_names = [name for name in routes if "orthoft_oft_Q" in name]
    assert q_names and all(routes[name] == "skew_packed" for name in q_names)
    q = dict(model.named_parameters())[next(n for n, _ in model.named_parameters() if "orthoft_oft_Q" in n)]
    assert q.shape == (4, 28)
    start = q.detach().clone()
    optimizer = build_optimizer(model, "muon", lr=0.02)
    assert any(g["view"] == "skew_packed" and any(p is q for p in g["params"]) for g in optimizer.param_groups)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert torch.isfinite(q).all() and not torch.equal(q.detach(), start)


def test_works_inside_accelerate() -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = TinyModel()
    optimizer = build_optimizer(model, "normuon", lr=1e-2, adamw_lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for step in range(20):
        tokens = torch.randint(0, 10, (8, 5), generator=torch.Generator().manual_seed(step))
        labels = tokens[:, 0] % 3
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens), labels)
        accelerator.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])
    state = optimizer.state_dict()
    assert {g["view"] for g in state["param_groups"]} >= {"skew_packed", "vector"}
    assert isinstance(optimizer.optimizer, NorMuon)


def test_root_routing_uses_moonlight_scaling_for_adapters() -> None:
    optimizer = build_optimizer(TinyModel(), "root", lr=1e-3)
    assert isinstance(optimizer, ROOT)
    assert {g["update_scale"] for g in optimizer.param_groups} == {"match_rms_adamw"}
