"""Small models and utilities shared by the adapter tests."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from orthoft.orthogonal.givens import GivensPlan, givens_pairs


class TinyMLP(nn.Module):
    """Linear layers with and without bias, for the common test battery."""

    def __init__(self, d_in: int = 64, d_hidden: int = 32, d_out: int = 16) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU()
        self.lin1 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


class TinyConv1D(nn.Module):
    """transformers GPT-2 style Conv1D layers (weight stored in x out)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(32, 64)  # nf=32 outputs, nx=64 inputs
        self.c_proj = Conv1D(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x)))


class TinyConvNet(nn.Module):
    """Conv2d layers with 1x1, 3x3 padded, non-square, strided and dilated kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(8, 8, kernel_size=3, padding=1)  # in_features 72
        self.conv1 = nn.Conv2d(8, 8, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0))  # 24
        self.conv2 = nn.Conv2d(8, 16, kernel_size=2, dilation=2, bias=False)  # 32
        self.conv3 = nn.Conv2d(16, 8, kernel_size=1)  # 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv0(x))
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.conv3(x)


def make_model(kind: str) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """(model, example input, target module names) for a layer kind."""
    torch.manual_seed(0)
    if kind == "linear":
        return TinyMLP(), torch.randn(2, 5, 64), ["lin0", "lin1"]
    if kind == "conv1d":
        return TinyConv1D(), torch.randn(2, 5, 64), ["c_fc", "c_proj"]
    if kind == "conv2d":
        return TinyConvNet(), torch.randn(2, 8, 12, 10), ["conv0", "conv1", "conv2", "conv3"]
    raise ValueError(kind)


def perturb_adapters(model: nn.Module, scale: float = 0.05) -> None:
    """Move every trainable adapter tensor away from its identity init, deterministically."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def layer_matrix(blocks: torch.Tensor, plan: GivensPlan, layer: int) -> torch.Tensor:
    """Dense Givens layer ``G_layer`` (1-based) alone, built from the pair list: an independent reference."""
    d = plan.features
    dense = torch.eye(d, dtype=blocks.dtype, device=blocks.device)
    pairs = givens_pairs(plan)
    offset = sum(len(left) for left, _ in pairs[: layer - 1])
    left, right = pairs[layer - 1]
    block = blocks[offset : offset + len(left)]
    dense[left, left] = block[:, 0, 0]
    dense[left, right] = block[:, 0, 1]
    dense[right, left] = block[:, 1, 0]
    dense[right, right] = block[:, 1, 1]
    return dense


def matrix_with_condition(rows: int, cols: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    """A random ``rows x cols`` float32 matrix with log-spaced singular values from 1 to ``1/condition``."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    singular_values = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    return ((u * singular_values) @ v.T).float()
