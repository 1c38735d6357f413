"""The float64 problems of the distributed tests: the same models on every rank and in the
single-process reference, and a global batch that the ranks split."""

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchjd.aggregation import MGDA, Aggregator, UPGrad

AGGREGATORS: dict[str, type[Aggregator]] = {"UPGrad": UPGrad, "MGDA": MGDA}


class MultiTask(nn.Module):
    """A shared trunk and two regression heads; returns the features and both predictions."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.trunk(x)
        return features, self.heads[0](features).squeeze(-1), self.heads[1](features).squeeze(-1)


def regressor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def multi_task() -> MultiTask:
    torch.manual_seed(0)
    return MultiTask().double()


def global_batch(size: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(size, 5, dtype=torch.float64, generator=generator)
    Y = torch.randn(size, 2, dtype=torch.float64, generator=generator)
    return X, Y


def per_sample_counts(world_size: int) -> list[int]:
    """Unequal local batch sizes, as the last batch of an epoch can give."""
    return [2 + r % 2 for r in range(world_size)]


def rows_of(rank: int, counts: list[int]) -> slice:
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


MTL_LOCAL_BATCH = 3  # equal local batches: the global task losses are the ranks' means


def batch_of(objectives: str, size: int) -> tuple[Tensor, Tensor]:
    """The global batch of ``size`` ranks: unequal shares for per-sample objectives, equal ones
    for objectives shared by the ranks (mean task losses)."""
    if objectives == "per_sample":
        return global_batch(sum(per_sample_counts(size)))
    return global_batch(MTL_LOCAL_BATCH * size)


def share_of(objectives: str, rank: int, size: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s share of ``batch_of(objectives, size)``."""
    X, Y = batch_of(objectives, size)
    if objectives == "per_sample":
        rows = rows_of(rank, per_sample_counts(size))
    else:
        rows = slice(rank * MTL_LOCAL_BATCH, (rank + 1) * MTL_LOCAL_BATCH)
    return X[rows], Y[rows]


def local_batches(
    rank: int, world_size: int
) -> Iterator[tuple[int, dist.ProcessGroup, Tensor, Tensor]]:
    """``(size, group, X, Y)``: this rank's share of the global batch of the group of every rank,
    then of the group of ranks 0 and 1 (one spawn for both sizes: starting processes is what
    costs). Every rank must run the loop (creating a group is a collective)."""
    pair = dist.new_group([0, 1])
    for size, group in [(world_size, dist.group.WORLD), (2, pair)]:
        if rank < size:
            counts = per_sample_counts(size)
            X, Y = global_batch(sum(counts))
            rows = rows_of(rank, counts)
            yield size, group, X[rows], Y[rows]


def two_objectives(out: Tensor, Y: Tensor) -> Tensor:
    """Two losses per sample of the predictions ``out`` ``[B]``, as ``[B, 2]``."""
    return torch.stack([(out - Y[:, 0]).pow(2), (out - Y[:, 1]).abs()], dim=1)


def mtl_losses(model: nn.Module, X: Tensor, Y: Tensor) -> tuple[Tensor, list[Tensor]]:
    features, out_1, out_2 = model(X)
    losses = [(out_1 - Y[:, 0]).pow(2).mean(), (out_2 - Y[:, 1]).pow(2).mean()]
    return features, losses


def per_sample_losses(model: nn.Module, X: Tensor, Y: Tensor) -> Tensor:
    return (model(X).squeeze(-1) - Y[:, 0]).pow(2)


def with_jac(rows: int, size: int = 3) -> torch.Tensor:
    """A float64 leaf ``[size]`` whose ``.jac`` holds ``0, 1, ...`` in ``rows`` rows."""
    param = torch.ones(size, dtype=torch.float64, requires_grad=True)
    param.jac = torch.arange(rows * size, dtype=torch.float64).view(rows, size)
    return param


def outcome_of(call: Any) -> tuple[str, str] | str:
    """``(exception type, message)`` when ``call()`` raises, else ``"returned"``."""
    try:
        call()
    except Exception as error:
        return type(error).__name__, str(error)
    return "returned"
