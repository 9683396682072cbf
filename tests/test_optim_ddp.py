"""DDP on CPU (gloo, 2 processes via torchrun): parameters stay identical across ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_optim_step.py"


def test_two_rank_ddp_keeps_parameters_identical(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a local rendezvous on a free port, so parallel runs do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stderr[-3000:]}")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(rank0) == set(rank1) == {"muon", "normuon", "turbomuon", "root", "auon", "hybridauon"}
    torch.manual_seed(0)
    for name in rank0:
        for key, value in rank0[name].items():
            torch.testing.assert_close(rank1[name][key], value, rtol=0, atol=0, msg=f"{name}: {key}")
        q = rank0[name]["layer.fake_Q.default"]
        assert torch.isfinite(q).all()
