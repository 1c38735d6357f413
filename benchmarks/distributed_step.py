"""Time one distributed step of Jacobian descent and count the bytes each rank sends into
collectives, for 1, 2 and 4 local gloo processes (CPU), with both engines.

Usage::

    python benchmarks/distributed_step.py [--steps 5] [--batch 64] [--world-sizes 1 2 4]

Model: an MLP 784-256-256-10, cross-entropy per sample (IWRM: one objective per sample of the
global batch), UPGrad. Per step, on every rank:

- data parallel (the global batch split evenly between the ranks):

  - ``autojac``: ``backward`` in ``ddp.no_sync()``, then ``torchjd.distributed.jac_to_grad`` with
    ``objectives="per_sample"`` (the full-matrix path and the block-wise Gramian path);
  - ``autojac (FSDP2)``: the layers wrapped by ``fully_shard``, ``backward``, then
    ``torchjd.distributed.fsdp_jac_to_grad`` with ``objectives="per_sample"`` (an all-to-all of the
    local Jacobians' shard columns, one all-reduce of the Gramian);
  - ``autogram exact (DDP)``: ``torchjd.distributed.compute_gramian``, ``UPGradWeighting``, the
    weighted backward with ``local_weights`` that DDP reduces;
  - ``autogram exact (FSDP2)``: the same lines with the layers wrapped by ``fully_shard``;
  - ``autogram own samples (DDP)``: the cheaper, inexact mode: each rank weights its samples by
    the Gramian of its own samples only (``engine.compute_gramian``), DDP reduces;

- sharded modules (every rank on the whole global batch, holding a disjoint shard of the layers:
  layer ``k`` on rank ``k mod R``; on 4 ranks, rank 3 holds none):

  - ``autojac sharded``: ``backward(losses, inputs=shard)``, then
    ``torchjd.distributed.sharded_jac_to_grad``;
  - ``autogram sharded``: ``torchjd.distributed.sharded_backward`` (one all-reduce of the
    Gramian, then the engine's fused step on the shard).

Columns: median step time (ms, the slowest rank) and the payload that each rank gives to
``torch.distributed`` collectives per step (KiB; an all-gather of ``b`` bytes on ``R`` ranks moves
``(R-1) b`` bytes to each rank, an all-reduce of ``b`` bytes counts ``b``, a reduce-scatter of
``b`` bytes ``(R-1) b / R``, an all-to-all of ``b`` bytes ``(R-1) b / R``; nothing on one
process). DDP's own all-reduce of the gradients is
counted as the size of the gradients; FSDP2's all-gathers and reduce-scatters are counted. One
torch thread per process; on a small shared machine the step times of several processes are an
upper bound.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import torchjd.distributed
from torchjd.aggregation import UPGrad, UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autojac import backward

DATA_PARALLEL = [
    "autojac",
    "autojac (block-wise Gramian)",
    "autojac (FSDP2)",
    "autogram exact (DDP)",
    "autogram exact (FSDP2)",
    "autogram own samples (DDP)",
]
SHARDED = ["autojac sharded", "autogram sharded"]
VARIANTS = DATA_PARALLEL + SHARDED


# the collectives counted: the bytes each rank gives per byte of its tensor on R ranks, and where
# the tensor is among the arguments (position, keyword)
_COLLECTIVES: dict[str, tuple[Callable[[int], float], int, str]] = {
    "all_gather": (lambda R: R - 1, 1, "tensor"),
    "all_gather_into_tensor": (lambda R: R - 1, 1, "input_tensor"),
    "all_reduce": (lambda R: 1 if R > 1 else 0, 0, "tensor"),
    "all_gather_single": (lambda R: R - 1, 1, "input_tensor"),  # FSDP2
    "reduce_scatter_single": (lambda R: (R - 1) / R, 1, "input"),  # FSDP2
    "all_to_all_single": (lambda R: (R - 1) / R, 1, "input"),
}


class _CountingCollectives:
    """Counts the bytes given to the collectives (torchjd's, and FSDP2's view of them)."""

    def __init__(self, world_size: int) -> None:
        self.bytes = 0.0
        self._R = world_size
        self._originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def _counted(self, name: str) -> Callable:
        original = self._originals[name]
        factor, position, keyword = _COLLECTIVES[name]

        def counted(*args: Any, **kw: Any) -> Any:
            tensor = args[position] if len(args) > position else kw[keyword]
            self.bytes += tensor.numel() * tensor.element_size() * factor(self._R)
            return original(*args, **kw)

        return counted

    def __enter__(self) -> "_CountingCollectives":
        for name in _COLLECTIVES:
            setattr(dist, name, self._counted(name))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


class _Setup:
    """The model of one variant on this rank, wrapped as the variant needs."""

    def __init__(self, variant: str, rank: int, world_size: int) -> None:
        self.variant = variant
        self.model = _model()
        layers = [m for m in self.model if isinstance(m, nn.Linear)]
        self.forward: nn.Module = self.model
        if variant in SHARDED:
            self.shard = [layer for k, layer in enumerate(layers) if k % world_size == rank]
            for layer in layers:
                layer.requires_grad_(layer in self.shard)
            self.engine = Engine(*self.shard, batch_dim=0) if self.shard else None
            return
        # autojac needs no engine (whose hooks would slow its forward pass)
        self.engine = Engine(self.model, batch_dim=0) if variant.startswith("autogram") else None
        if variant.endswith("(FSDP2)"):
            mesh = init_device_mesh("cpu", (world_size,))
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        else:
            self.forward = DDP(self.model)

    def step(self, x: Tensor, y: Tensor) -> None:
        variant, model, forward, engine = self.variant, self.model, self.forward, self.engine
        loss_fn = nn.CrossEntropyLoss(reduction="none")
        if variant == "autojac (FSDP2)":
            backward(loss_fn(forward(x), y))
            torchjd.distributed.fsdp_jac_to_grad(model, UPGrad(), objectives="per_sample")
        elif variant.startswith("autojac") and variant not in SHARDED:
            assert isinstance(forward, DDP)
            with forward.no_sync():
                backward(loss_fn(forward(x), y))
            torchjd.distributed.jac_to_grad(
                model.parameters(),
                UPGrad(),
                objectives="per_sample",
                optimize_gramian_computation=variant != "autojac",
            )
        elif variant == "autojac sharded":
            losses = loss_fn(forward(x), y)
            params = [p for layer in self.shard for p in layer.parameters()]
            if params:
                backward(losses, inputs=params)
            torchjd.distributed.sharded_jac_to_grad(params, UPGrad())
        elif variant == "autogram sharded":
            losses = loss_fn(forward(x), y)
            torchjd.distributed.sharded_backward(engine, losses, UPGradWeighting())
        elif variant == "autogram own samples (DDP)":
            assert engine is not None
            losses = loss_fn(forward(x), y)
            losses.backward(UPGradWeighting()(engine.compute_gramian(losses)))
        else:  # exact, DDP or FSDP2
            assert engine is not None
            losses = loss_fn(forward(x), y)
            weights = UPGradWeighting()(torchjd.distributed.compute_gramian(engine, losses))
            losses.backward(torchjd.distributed.local_weights(weights, losses))
        for p in model.parameters():
            p.grad = None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _rank(rank: int, world_size: int, folder: str, steps: int, batch: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size
    )
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(batch, 784, generator=generator)
    Y = torch.randint(0, 10, (batch,), generator=generator)
    local = slice(rank * batch // world_size, (rank + 1) * batch // world_size)
    results = {}
    for variant in VARIANTS:
        setup = _Setup(variant, rank, world_size)
        x, y = (X, Y) if variant in SHARDED else (X[local], Y[local])
        times = []
        for _ in range(steps + 1):  # the first one warms up
            dist.barrier()
            with _CountingCollectives(world_size) as counter:
                start = time.perf_counter()
                setup.step(x, y)
                times.append(time.perf_counter() - start)
        model = setup.model
        gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        ddp_reduces = "(DDP)" in variant and variant.startswith("autogram") and world_size > 1
        sent = counter.bytes + (gradient_bytes if ddp_reduces else 0)
        results[variant] = (statistics.median(times[1:]), sent)
        setup.close()
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print(f"MLP 784-256-256-10, global batch {args.batch}, UPGrad, gloo on CPU")
    print(f"{'variant':<30}{'ranks':>6}{'step (ms)':>12}{'KiB / rank':>12}")
    for world_size in args.world_sizes:
        with tempfile.TemporaryDirectory() as folder:
            mp.start_processes(
                _rank, args=(world_size, folder, args.steps, args.batch), nprocs=world_size
            )
            ranks = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(world_size)]
        for variant in VARIANTS:
            step = max(r[variant][0] for r in ranks)
            sent = max(r[variant][1] for r in ranks)
            print(f"{variant:<30}{world_size:>6}{1000 * step:>12.1f}{sent / 2**10:>12.1f}")


if __name__ == "__main__":
    main()
