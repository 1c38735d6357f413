"""IWRM with UPGrad on 2 processes under DistributedDataParallel, exact: every rank makes the step
that one process would make on the global batch.

Each rank computes the Jacobian of its own samples' losses inside ``ddp.no_sync()`` (DDP's
gradient reduction stays out of the way); ``torchjd.distributed.jac_to_grad`` gathers the rows of
every rank (``objectives="per_sample"``: each sample's loss is an objective of its own) and
aggregates the global Jacobian identically on every rank.

Run: ``python examples/distributed_iwrm.py`` (starts 2 CPU processes with the gloo backend), or
``torchrun --standalone --nproc_per_node=2 examples/distributed_iwrm.py``.
"""

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.nn.parallel import DistributedDataParallel
from torch.optim import SGD

import torchjd.distributed
from torchjd.aggregation import UPGrad
from torchjd.autojac import backward, jac_to_grad

WORLD_SIZE = 2
STEPS = 8


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, 16, 10, generator=generator), torch.randn(
        STEPS, 16, generator=generator
    )


def new_model() -> Sequential:
    torch.manual_seed(0)
    return Sequential(Linear(10, 5), ReLU(), Linear(5, 1))


def train(rank: int, world_size: int) -> Sequential:
    """Trains on this rank's share of each batch; returns the model (the same on every rank)."""
    X, Y = data()
    shard = slice(rank * 16 // world_size, (rank + 1) * 16 // world_size)
    model = new_model()
    ddp = DistributedDataParallel(model)
    optimizer = SGD(model.parameters(), lr=0.1)
    loss_fn = MSELoss(reduction="none")
    for x, y in zip(X[:, shard], Y[:, shard]):
        with ddp.no_sync():
            losses = loss_fn(ddp(x).squeeze(dim=1), y)  # shape: [16 / world_size]
            backward(losses)
        torchjd.distributed.jac_to_grad(model.parameters(), UPGrad(), objectives="per_sample")
        optimizer.step()
        optimizer.zero_grad()
    return model


def train_single_process() -> Sequential:
    """The same training in one process, on the global batches, for comparison."""
    X, Y = data()
    model = new_model()
    optimizer = SGD(model.parameters(), lr=0.1)
    loss_fn = MSELoss(reduction="none")
    for x, y in zip(X, Y):
        backward(loss_fn(model(x).squeeze(dim=1), y))
        jac_to_grad(model.parameters(), UPGrad())
        optimizer.step()
        optimizer.zero_grad()
    return model


def worker(rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size
    )
    try:
        model = train(rank, world_size)
        torch.save(model.state_dict(), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and "RANK" in os.environ:  # launched by torchrun
    dist.init_process_group("gloo")
    trained = train(dist.get_rank(), dist.get_world_size())
    print(f"rank {dist.get_rank()}: first bias {trained[0].bias[0].item():.6f}")  # equal on all
    dist.destroy_process_group()
elif __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        # a fork server imports torch once for both ranks (spawn where it does not exist)
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        mp.set_forkserver_preload(["torch", "torchjd"])
        mp.start_processes(
            worker, args=(WORLD_SIZE, folder), nprocs=WORLD_SIZE, start_method=method
        )
        rank_states = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    single_state = train_single_process().state_dict()
    gap = max((rank_states[0][k] - single_state[k]).abs().max().item() for k in single_state)
    print(f"{WORLD_SIZE} ranks, {STEPS} steps; largest gap to one process on all data: {gap:.2e}")
