"""Run a few DDP steps with each orthoft optimizer and save this rank's parameters.

Usage: torchrun --nproc_per_node 2 tests/scripts/ddp_optim_step.py OUT_DIR
Each rank sees different data; DDP averages the gradients, and the orthogonalized step must then
leave the parameters identical on every rank (tests/test_optim_ddp.py compares the files).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the fake adapter

from test_optim_helpers import TinyModel  # noqa: E402

from orthoft.optim import build_optimizer  # noqa: E402

OPTIMIZERS = ("muon", "normuon", "turbomuon", "root", "auon", "hybridauon")


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    saved = {}
    for name in OPTIMIZERS:
        torch.manual_seed(0)  # same initial weights on every rank
        model = DistributedDataParallel(TinyModel())
        optimizer = build_optimizer(model, name, lr=1e-2, adamw_lr=1e-2, weight_decay=0.01)
        generator = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(3):
            tokens = torch.randint(0, 10, (8, 5), generator=generator)
            labels = torch.randint(0, 3, (8,), generator=generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(tokens), labels).backward()
            optimizer.step()
        saved[name] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    torch.save(saved, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
