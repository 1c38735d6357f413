"""torchjd.distributed.jac_to_grad under DistributedDataParallel (in ``no_sync()``) on 2 and 4 gloo
processes gives on every rank the update of torchjd.autojac on the global batch in one process."""

import itertools
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import torchjd.autojac
from tests.distributed.launch import run_on_ranks
from tests.distributed.problems import (
    AGGREGATORS,
    global_batch,
    mtl_losses,
    multi_task,
    per_sample_counts,
    per_sample_losses,
    regressor,
    rows_of,
)
from torchjd.distributed import average_grads, jac_to_grad

MTL_LOCAL_BATCH = 3
CASES = list(itertools.product(AGGREGATORS, ["per_sample", "shared"], [False, True]))
Update = tuple[torch.Tensor | None, list[torch.Tensor]]  # the weights and every .grad


def _step(
    case: tuple[str, str, bool], X: torch.Tensor, Y: torch.Tensor, rank: int | None
) -> Update:
    """One step of Jacobian descent on (X, Y): on the local batch under DDP when ``rank`` is
    given, else in one process on the global batch (then the torchjd.autojac functions)."""
    name, objectives, optimize = case
    aggregator = AGGREGATORS[name]()
    if objectives == "per_sample":
        model = regressor()
        ddp = DistributedDataParallel(model) if rank is not None else model
        with ddp.no_sync() if rank is not None else torch.enable_grad():
            torchjd.autojac.backward(per_sample_losses(ddp, X, Y))
        shared, specific = list(model.parameters()), []
    else:
        model = multi_task()
        ddp = DistributedDataParallel(model) if rank is not None else model
        with ddp.no_sync() if rank is not None else torch.enable_grad():
            features, losses = mtl_losses(ddp, X, Y)
            torchjd.autojac.mtl_backward(losses, features=features)
        shared, specific = list(model.trunk.parameters()), list(model.heads.parameters())
    if rank is None:
        weights = torchjd.autojac.jac_to_grad(
            shared, aggregator, optimize_gramian_computation=optimize
        )
    else:
        weights = jac_to_grad(
            shared, aggregator, objectives=objectives, optimize_gramian_computation=optimize
        )
        if specific:
            average_grads(specific)
    return weights, [p.grad for p in model.parameters()]


def _local_batch(case: tuple[str, str, bool], rank: int, world_size: int) -> tuple[Any, Any]:
    if case[1] == "per_sample":
        counts = per_sample_counts(world_size)
        X, Y = global_batch(sum(counts))
        return X[rows_of(rank, counts)], Y[rows_of(rank, counts)]
    X, Y = global_batch(MTL_LOCAL_BATCH * world_size)
    rows = slice(rank * MTL_LOCAL_BATCH, (rank + 1) * MTL_LOCAL_BATCH)
    return X[rows], Y[rows]


def _distributed_steps(rank: int, world_size: int) -> dict[tuple[str, str, bool], Update]:
    return {case: _step(case, *_local_batch(case, rank, world_size), rank) for case in CASES}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda r: f"{r}ranks")
def distributed(request: pytest.FixtureRequest) -> tuple[int, list[Any]]:
    world_size = request.param
    return world_size, run_on_ranks(_distributed_steps, world_size)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-optimized={c[2]}")
def test_equals_single_process_on_global_batch(
    distributed: tuple[int, list[Any]], case: tuple[str, str, bool]
) -> None:
    world_size, results = distributed
    for result in results:
        assert isinstance(result, dict), result  # else ("raised", type, message)
    if case[1] == "per_sample":
        X, Y = global_batch(sum(per_sample_counts(world_size)))
    else:
        X, Y = global_batch(MTL_LOCAL_BATCH * world_size)
    expected_weights, expected_grads = _step(case, X, Y, rank=None)
    first_weights, first_grads = results[0][case]
    for weights, grads in (result[case] for result in results):
        # the same update on every rank, bit for bit
        assert torch.equal(weights, first_weights)
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, first_grads, strict=True))
    torch.testing.assert_close(first_weights, expected_weights, rtol=0, atol=1e-6)
    for grad, expected in zip(first_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
