"""Time one distributed step of Jacobian descent and count the bytes each rank sends into
collectives, for 1, 2 and 4 local gloo processes (CPU), with both engines.

Usage::

    python benchmarks/distributed_step.py [--steps 5] [--batch 64] [--world-sizes 1 2 4]

Model: an MLP 784-256-256-10, cross-entropy per sample (IWRM: one objective per sample of the
global batch, split evenly between the ranks), UPGrad. Per step, on every rank:

- autojac: ``backward`` in ``ddp.no_sync()``, then ``torchjd.distributed.jac_to_grad`` with
  ``objectives="per_sample"`` (the full-matrix path and the block-wise Gramian path);
- autogram: ``torchjd.distributed.compute_gramian``, ``UPGradWeighting``, the weighted backward
  that DDP reduces.

Columns: median step time (ms, the slowest rank) and the payload that each rank gives to
``torch.distributed`` collectives per step (MiB; an all-gather of ``b`` bytes on ``R`` ranks moves
``(R-1) b`` bytes to each rank). DDP's own all-reduce of the gradients (autogram only) is counted as
the size of the gradients. One torch thread per process; on a small shared machine the step times
of several processes are an upper bound.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchjd.distributed
from torchjd.aggregation import UPGrad, UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autojac import backward

VARIANTS = ["autojac", "autojac (block-wise Gramian)", "autogram"]


class _CountingCollectives:
    """Counts the bytes given to all_gather and all_reduce (torchjd's and DDP's view of them)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._originals = (dist.all_gather, dist.all_reduce)

    def __enter__(self) -> "_CountingCollectives":
        all_gather, all_reduce = self._originals

        def counted_gather(outputs: list, tensor: torch.Tensor, *args: object, **kw: object):
            self.bytes += tensor.numel() * tensor.element_size() * (len(outputs) - 1)
            return all_gather(outputs, tensor, *args, **kw)

        def counted_reduce(tensor: torch.Tensor, *args: object, **kw: object):
            self.bytes += tensor.numel() * tensor.element_size()
            return all_reduce(tensor, *args, **kw)

        dist.all_gather, dist.all_reduce = counted_gather, counted_reduce
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_gather, dist.all_reduce = self._originals


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _one_step(variant: str, model: nn.Module, ddp: DDP, engine: Engine, x, y) -> None:
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    if variant == "autogram":
        losses = loss_fn(ddp(x), y)
        weights = UPGradWeighting()(torchjd.distributed.compute_gramian(engine, losses))
        losses.backward(torchjd.distributed.local_weights(weights, losses))
    else:
        with ddp.no_sync():
            backward(loss_fn(ddp(x), y))
        torchjd.distributed.jac_to_grad(
            model.parameters(),
            UPGrad(),
            objectives="per_sample",
            optimize_gramian_computation=variant != "autojac",
        )
    for p in model.parameters():
        p.grad = None


def _rank(rank: int, world_size: int, folder: str, steps: int, batch: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size
    )
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(batch, 784, generator=generator)
    Y = torch.randint(0, 10, (batch,), generator=generator)
    local = slice(rank * batch // world_size, (rank + 1) * batch // world_size)
    x, y = X[local], Y[local]
    results = {}
    for variant in VARIANTS:
        model = _model()
        engine = Engine(model, batch_dim=0)
        ddp = DDP(model)
        times = []
        for _ in range(steps + 1):  # the first one warms up
            dist.barrier()
            with _CountingCollectives() as counter:
                start = time.perf_counter()
                _one_step(variant, model, ddp, engine, x, y)
                times.append(time.perf_counter() - start)
        gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        sent = counter.bytes + (gradient_bytes if variant == "autogram" and world_size > 1 else 0)
        results[variant] = (statistics.median(times[1:]), sent)
        engine.close()
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print(f"MLP 784-256-256-10, global batch {args.batch}, UPGrad, gloo on CPU")
    print(f"{'variant':<30}{'ranks':>6}{'step (ms)':>12}{'MiB / rank':>12}")
    for world_size in args.world_sizes:
        with tempfile.TemporaryDirectory() as folder:
            mp.start_processes(
                _rank, args=(world_size, folder, args.steps, args.batch), nprocs=world_size
            )
            ranks = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(world_size)]
        for variant in VARIANTS:
            step = max(r[variant][0] for r in ranks)
            sent = max(r[variant][1] for r in ranks)
            print(f"{variant:<30}{world_size:>6}{1000 * step:>12.1f}{sent / 2**20:>12.2f}")


if __name__ == "__main__":
    main()
