"""IWRM with UPGrad and the autogram engine on 2 processes that share the model's layers: each rank
owns one layer (its engine hooks it, its optimizer steps it), both run the same forward pass on
the same batch, and the step is the one of one process holding the whole model.

``torchjd.distributed.sharded_backward`` sums the two ranks' Gramians (one all-reduce of the
``[16, 16]`` matrix), weights the losses identically on both ranks and backpropagates the weights
into this rank's layer only. After the optimizer step, each rank sends its updated layer to the
other one (``dist.broadcast`` from the owner) for the next forward pass.

Run: ``python examples/sharded_autogram.py`` (starts 2 CPU processes with the gloo backend).
"""

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

import torchjd.distributed
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

WORLD_SIZE = 2
STEPS = 8
OWNERS = {0: 0, 2: 1}  # the index of each layer with parameters in the model, and its rank


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, 16, 10, generator=generator), torch.randn(
        STEPS, 16, generator=generator
    )


def new_model() -> Sequential:
    torch.manual_seed(0)
    return Sequential(Linear(10, 5), ReLU(), Linear(5, 1))


def train(rank: int) -> Sequential:
    """Trains this rank's layer on every batch; returns the model (the same on every rank)."""
    model = new_model()
    mine = [model[k] for k, owner in OWNERS.items() if owner == rank]
    for k in OWNERS:
        model[k].requires_grad_(model[k] in mine)  # the other rank computes those gradients
    engine = Engine(*mine, batch_dim=0)
    optimizer = SGD([p for layer in mine for p in layer.parameters()], lr=0.1)
    loss_fn = MSELoss(reduction="none")
    for x, y in zip(*data()):
        losses = loss_fn(model(x).squeeze(dim=1), y)  # the same 16 losses on every rank
        torchjd.distributed.sharded_backward(engine, losses, UPGradWeighting())
        optimizer.step()
        optimizer.zero_grad()
        for k, owner in OWNERS.items():  # every rank gets every updated layer
            for p in model[k].parameters():
                dist.broadcast(p.data, src=owner)
    engine.close()
    return model


def train_single_process() -> Sequential:
    """The same training in one process holding the whole model, for comparison."""
    model = new_model()
    engine = Engine(model, batch_dim=0)
    optimizer = SGD(model.parameters(), lr=0.1)
    loss_fn = MSELoss(reduction="none")
    for x, y in zip(*data()):
        engine.backward(loss_fn(model(x).squeeze(dim=1), y), UPGradWeighting())
        optimizer.step()
        optimizer.zero_grad()
    engine.close()
    return model


def worker(rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size
    )
    try:
        torch.save(train(rank).state_dict(), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
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
    print(f"{WORLD_SIZE} ranks, {STEPS} steps; largest gap to one process: {gap:.2e}")
