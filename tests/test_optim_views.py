"""Matrix views: round trips, block independence, and errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from test_optim_helpers import single_thread  # noqa: F401  (autouse fixture)

from orthoft.optim import Muon, NorMuon, TurboMuon, get_view
from orthoft.optim.views import check_view, skew_block_size


@pytest.mark.parametrize("shape", [(5, 28), (3, 2, 6), (1,)])
def test_skew_packed_round_trip_matches_triu_order(shape: tuple[int, ...]) -> None:
    packed = torch.randn(shape)
    view = get_view("skew_packed")
    mats = view.to_matrices(packed)
    b = skew_block_size(shape[-1])
    assert mats.shape == (packed.numel() // shape[-1], b, b)
    torch.testing.assert_close(mats, -mats.mT)
    rows, cols = torch.triu_indices(b, b, 1)
    torch.testing.assert_close(mats[0, rows, cols], packed.reshape(-1, shape[-1])[0])
    torch.testing.assert_close(view.from_matrices(mats, packed), packed)


@pytest.mark.parametrize(("name", "shape"), [("matrix", (7, 3)), ("matrix_stack", (2, 3, 4, 5))])
def test_matrix_views_round_trip(name: str, shape: tuple[int, ...]) -> None:
    t = torch.randn(shape)
    view = get_view(name)
    mats = view.to_matrices(t)
    assert mats.shape == (t.numel() // (shape[-2] * shape[-1]), *shape[-2:])
    torch.testing.assert_close(view.from_matrices(mats, t), t)


def test_view_errors_name_the_tensor_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"layer\.Q.*b\(b-1\)/2.*matrix_stack"):
        check_view("skew_packed", torch.zeros(4, 11), label="layer.Q")
    with pytest.raises(ValueError, match="matrix_stack"):
        check_view("matrix", torch.zeros(2, 3, 4), label="layer.U")
    with pytest.raises(ValueError, match="use one of"):
        check_view("diagonal", torch.zeros(3), label="layer.d")
    check_view("vector", torch.zeros(3), label="layer.s")


@pytest.mark.parametrize("optimizer_class", [Muon, NorMuon, TurboMuon])
@pytest.mark.parametrize(
    ("view", "shape", "block_dims"), [("skew_packed", (3, 2, 15), 1), ("matrix_stack", (4, 6, 5), 2)]
)
def test_blocks_are_orthogonalized_independently(
    optimizer_class: type, view: str, shape: tuple[int, ...], block_dims: int
) -> None:
    """Replacing one block's gradient changes that block's update only."""
    block_shape = shape[-block_dims:]
    grad = torch.randn(shape)
    other_grad = grad.clone()
    other_grad.view(-1, *block_shape)[0] = torch.randn(block_shape)
    updates = []
    for g in (grad, other_grad):
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = g
        optimizer_class([{"params": [p], "view": view}], lr=0.1).step()
        updates.append(p.detach().view(-1, *block_shape))
    first, second = updates
    assert (first[0] - second[0]).abs().max() > 1e-3
    torch.testing.assert_close(first[1:], second[1:], rtol=0, atol=1e-6)


def test_skew_update_is_orthogonal_per_block() -> None:
    """Through the skew view each block's update, unpacked, is the orthogonalized skew gradient."""
    b = 8
    p = torch.nn.Parameter(torch.zeros(4, b * (b - 1) // 2))
    p.grad = torch.randn_like(p)
    Muon([{"params": [p], "view": "skew_packed"}], lr=1.0, momentum=0.0, nesterov=False, ns_method="polar_express",
         ns_steps=8).step()
    blocks = get_view("skew_packed").to_matrices(-p.detach())
    singular_values = torch.linalg.svdvals(blocks.double())
    assert (singular_values - 1).abs().max() < 0.05
