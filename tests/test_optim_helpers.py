"""Shared pieces for the optim tests (no tests here): a fake adapter layer with ``optimizer_views``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orthoft.optim.views import skew_to_matrices


class FakeAdapterLayer(nn.Module):
    """Wraps a frozen Linear; every declared tensor kind takes part in the forward pass."""

    optimizer_views = {"fake_Q": "skew_packed", "fake_U": "matrix", "fake_stack": "matrix_stack", "fake_s": "vector"}

    def __init__(self, base: nn.Linear, block_size: int = 4, rank: int = 3) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        self.block_size = block_size
        packed = block_size * (block_size - 1) // 2
        self.fake_Q = nn.ParameterDict({"default": nn.Parameter(0.1 * torch.randn(d_in // block_size, packed))})
        self.fake_U = nn.ParameterDict({"default": nn.Parameter(torch.randn(d_in, rank) / d_in**0.5)})
        self.fake_stack = nn.ParameterDict({"default": nn.Parameter(0.1 * torch.randn(2, rank, d_out))})
        self.fake_s = nn.ParameterDict({"default": nn.Parameter(torch.ones(d_out))})
        # A second adapter that is not being trained: routing must skip it.
        self.fake_Q["frozen"] = nn.Parameter(torch.zeros(d_in // block_size, packed), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skew = skew_to_matrices(self.fake_Q["default"])
        rotation = torch.eye(self.block_size) + skew  # first-order rotation is enough for a test
        blocks = x.reshape(*x.shape[:-1], -1, self.block_size)
        x = torch.einsum("...kb,kbc->...kc", blocks, rotation).reshape(x.shape)
        low_rank = (x @ self.fake_U["default"]) @ self.fake_stack["default"].sum(0)
        return self.fake_s["default"] * (self.base(x) + low_rank)


class TinyModel(nn.Module):
    def __init__(self, d: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.layer = FakeAdapterLayer(nn.Linear(d, d))
        self.hidden = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(1)
        h = self.norm(torch.tanh(self.hidden(self.layer(h))))
        return self.classifier(h)


def tiny_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 10, (8, 5), generator=generator)
    labels = torch.randint(0, 3, (8,), generator=generator)
    return tokens, labels


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> list[float]:
    losses = []
    for step in range(steps):
        tokens, labels = tiny_batch(seed + step)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls on a shared 2-core machine: a 2-thread OpenMP pool stalls ~0.2 s per op when the
    other core is busy, so the optim tests run single-threaded and restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
