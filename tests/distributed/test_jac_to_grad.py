"""torchjd.distributed.jac_to_grad under DistributedDataParallel (in ``no_sync()``) on 2 and 4 gloo
processes gives on every rank the update of torchjd.autojac on the global batch in one process."""

import itertools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchjd.autojac
from tests.distributed.problems import (
    AGGREGATORS,
    batch_of,
    mtl_losses,
    multi_task,
    per_sample_losses,
    regressor,
    share_of,
)
from torchjd.distributed import average_grads, jac_to_grad

CASES = list(itertools.product(AGGREGATORS, ["per_sample", "shared"], [False, True]))
Case = tuple[str, str, bool]  # aggregator, objectives, optimize_gramian_computation
Update = tuple[torch.Tensor | None, list[torch.Tensor]]  # the weights and every .grad


def _models(group: dist.ProcessGroup | None) -> dict[str, tuple[nn.Module, Any]]:
    """The model of each kind of objectives, and the module that computes the losses: the model
    wrapped in DDP over ``group``, or the model itself when ``group`` is None."""
    models: dict[str, nn.Module] = {"per_sample": regressor(), "shared": multi_task()}
    return {
        objectives: (model, model if group is None else DDP(model, process_group=group))
        for objectives, model in models.items()
    }


def _step(
    case: Case,
    X: torch.Tensor,
    Y: torch.Tensor,
    group: dist.ProcessGroup | None,
    models: dict[str, tuple[nn.Module, Any]],
) -> Update:
    """One step of Jacobian descent on (X, Y): on the local batch under DDP over ``group``, or in
    one process on the global batch with the torchjd.autojac functions when ``group`` is None."""
    name, objectives, optimize = case
    aggregator = AGGREGATORS[name]()
    model, ddp = models[objectives]
    for p in model.parameters():
        p.grad = None
    with ddp.no_sync() if group is not None else torch.enable_grad():
        if objectives == "per_sample":
            torchjd.autojac.backward(per_sample_losses(ddp, X, Y))
        else:
            features, losses = mtl_losses(ddp, X, Y)
            torchjd.autojac.mtl_backward(losses, features=features)
    if objectives == "per_sample":
        shared, specific = list(model.parameters()), []
    else:
        shared, specific = list(model.trunk.parameters()), list(model.heads.parameters())
    if group is None:
        weights = torchjd.autojac.jac_to_grad(
            shared, aggregator, optimize_gramian_computation=optimize
        )
    else:
        weights = jac_to_grad(
            shared,
            aggregator,
            objectives=objectives,
            process_group=group,
            optimize_gramian_computation=optimize,
        )
        if specific:
            average_grads(specific, process_group=group)
    return weights, [p.grad for p in model.parameters()]


def distributed_steps(rank: int, world_size: int) -> dict[tuple[int, Case], Update]:
    """Every case on the 4 ranks, then on the group of ranks 0 and 1 (one spawn for both sizes:
    starting processes is what costs)."""
    results = {}
    pair = dist.new_group([0, 1])
    for size, group in [(world_size, dist.group.WORLD), (2, pair)]:
        if rank < size:
            models = _models(group)
            for case in CASES:
                X, Y = share_of(case[1], rank, size)
                results[size, case] = _step(case, X, Y, group, models)
    return results


@pytest.fixture
def distributed(four_ranks: list[Any]) -> list[Any]:
    return [result["autojac"] for result in four_ranks]


@pytest.mark.parametrize("world_size", [2, 4], ids=lambda r: f"{r}ranks")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-optimized={c[2]}")
def test_equals_single_process_on_global_batch(
    distributed: list[Any], world_size: int, case: Case
) -> None:
    results = [result[world_size, case] for result in distributed[:world_size]]
    X, Y = batch_of(case[1], world_size)
    expected_weights, expected_grads = _step(case, X, Y, None, _models(None))
    first_weights, first_grads = results[0]
    for weights, grads in results:
        # the same update on every rank, bit for bit
        assert torch.equal(weights, first_weights)
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, first_grads, strict=True))
    torch.testing.assert_close(first_weights, expected_weights, rtol=0, atol=1e-6)
    for grad, expected in zip(first_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
