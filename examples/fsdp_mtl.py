"""Multi-task learning with UPGrad on 2 processes under FSDP2 (``fully_shard``), exact: every rank
makes its part of the step that one process would make on the global batch.

Each rank computes the mean task losses on its share of the batch, and ``mtl_backward`` their
Jacobian with respect to the (all-gathered) shared parameters.
``torchjd.distributed.fsdp_jac_to_grad`` averages the ranks' Jacobians into the shards
(``objectives="shared"``: the same tasks on every rank, equal local batch sizes), sums the shards'
Gramians and writes each rank's part of the UPGrad step into the ``.grad`` of its shards
(DTensors, which the optimizer updates as usual).

Run: ``python examples/fsdp_mtl.py`` (starts 2 CPU processes with the gloo backend), or
``torchrun --standalone --nproc_per_node=2 examples/fsdp_mtl.py``.
"""

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.optim import SGD

import torchjd.distributed
from torchjd.aggregation import UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward

WORLD_SIZE = 2
STEPS = 8


class MultiTask(nn.Module):
    """A shared trunk and one regression head per task; returns the features and predictions."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.trunk(x)
        return features, torch.cat([head(features) for head in self.heads], dim=1)


def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, 16, 10, generator=generator), torch.randn(
        STEPS, 16, 2, generator=generator
    )


def new_model() -> MultiTask:
    torch.manual_seed(0)
    return MultiTask()


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
    features, predictions = model(x)
    return features, [(predictions[:, t] - y[:, t]).pow(2).mean() for t in range(2)]


def train(rank: int, world_size: int) -> dict[str, Tensor]:
    """Trains on this rank's share of each batch; returns the whole trained parameters."""
    X, Y = data()
    shard = slice(rank * 16 // world_size, (rank + 1) * 16 // world_size)
    model = new_model()
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model.trunk, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the heads, and every parameter left
    optimizer = SGD(model.parameters(), lr=0.1)
    for x, y in zip(X[:, shard], Y[:, shard]):
        features, losses = task_losses(model, x, y)
        mtl_backward(losses, features=features)
        torchjd.distributed.fsdp_jac_to_grad(model, UPGrad(), objectives="shared")
        optimizer.step()
        optimizer.zero_grad()
    # gathering the shards is a collective: every rank, in the same order
    return {name: value.full_tensor() for name, value in model.state_dict().items()}


def train_single_process() -> MultiTask:
    """The same training in one process, on the global batches, for comparison."""
    X, Y = data()
    model = new_model()
    optimizer = SGD(model.parameters(), lr=0.1)
    for x, y in zip(X, Y):
        features, losses = task_losses(model, x, y)
        mtl_backward(losses, features=features)
        jac_to_grad(model.trunk.parameters(), UPGrad())
        optimizer.step()
        optimizer.zero_grad()
    return model


def worker(rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size
    )
    try:
        torch.save(train(rank, world_size), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and "RANK" in os.environ:  # launched by torchrun
    dist.init_process_group("gloo")
    trained = train(dist.get_rank(), dist.get_world_size())
    first_bias = trained["trunk.0.bias"][0].item()
    print(f"rank {dist.get_rank()}: first bias {first_bias:.6f}")  # equal on all
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
