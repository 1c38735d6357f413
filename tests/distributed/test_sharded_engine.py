"""torchjd.distributed.sharded_compute_gramian and sharded_backward on 2 and 4 gloo processes, each
rank's engine hooking a disjoint shard of the modules of the same model on the same batch: the
Gramian, the weights and each shard's gradients of the engine in one process on the whole model."""

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from tests.distributed.problems import global_batch, two_objectives
from torchjd.aggregation import MGDAWeighting, UPGradWeighting
from torchjd.autogram import Engine
from torchjd.distributed import sharded_backward, sharded_compute_gramian

BATCH = 5
WEIGHTINGS = {"UPGrad": UPGradWeighting, "MGDA": MGDAWeighting}
# the indices, in the model, of the modules that each rank holds (rank 3 of 4 holds none)
SHARDS = {2: [[0, 3], [2, 4]], 4: [[0], [2, 3], [4], []]}
MODES = ["gramian", "gramian, batch_dim=None", "fused"]
Step = tuple[Tensor, Tensor, dict[str, Tensor]]  # the Gramian, the weights, the shard's .grad


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)]
    return nn.Sequential(*layers).double()


def _losses(model: nn.Module) -> Tensor:
    """Two objectives per sample, ``[B, 2]``, on the same batch everywhere."""
    X, Y = global_batch(BATCH)
    return two_objectives(model(X).squeeze(-1), Y)


def _step(name: str, mode: str, shard: list[int] | None, group: dist.ProcessGroup | None) -> Step:
    """The step with this rank's ``shard`` of the modules, or on the whole model in one process
    when ``group`` is None; ``mode``: the fused step, or the Gramian then the weighted backward,
    with an engine with or without batch dimension."""
    model = _model()
    owned = list(range(len(model))) if shard is None else shard
    for k, module in enumerate(model):
        module.requires_grad_(k in owned)  # the other ranks' parameters
    modules = [model[k] for k in owned]
    batch_dim = None if mode == "gramian, batch_dim=None" else 0
    engine = Engine(*modules, batch_dim=batch_dim) if modules else None
    losses = _losses(model)
    weighting = WEIGHTINGS[name]()
    if group is None:
        assert engine is not None
        gramian = engine.compute_gramian(losses)
        weights = weighting(gramian)
        losses.backward(weights.view_as(losses))
    elif mode == "fused":
        gramian = torch.empty(0)  # not returned by the fused step
        weights = sharded_backward(engine, losses, weighting, process_group=group)
    else:
        gramian = sharded_compute_gramian(engine, losses, process_group=group)
        weights = weighting(gramian)
        if modules:
            losses.backward(weights.view_as(losses))
    if engine is not None:
        engine.close()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return gramian, weights, grads


def distributed_steps(rank: int, world_size: int) -> dict[tuple[int, str, str], Step]:
    results = {}
    pair = dist.new_group([0, 1])
    for size, group in [(world_size, dist.group.WORLD), (2, pair)]:
        if rank < size:
            for name in WEIGHTINGS:
                for mode in MODES:
                    results[size, name, mode] = _step(name, mode, SHARDS[size][rank], group)
    return results


@pytest.fixture
def distributed(four_ranks: list[Any]) -> list[Any]:
    return [result["sharded_autogram"] for result in four_ranks]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(WEIGHTINGS))
@pytest.mark.parametrize("world_size", [2, 4], ids=lambda r: f"{r}ranks")
def test_equals_single_process_on_whole_model(
    distributed: list[Any], world_size: int, name: str, mode: str
) -> None:
    expected_gramian, expected_weights, expected_grads = _step(name, "gramian", None, None)
    results = [result[world_size, name, mode] for result in distributed[:world_size]]
    seen = set()
    for gramian, weights, grads in results:
        assert torch.equal(weights, results[0][1])  # the same weights on every rank, bit for bit
        torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6)
        if mode != "fused":
            torch.testing.assert_close(gramian, expected_gramian, rtol=0, atol=1e-6)
        for key, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[key], rtol=0, atol=1e-6)
        assert not seen & grads.keys()  # the shards are disjoint
        seen |= grads.keys()
    assert seen == expected_grads.keys()  # and cover the model
    assert expected_gramian.shape == (2 * BATCH, 2 * BATCH)
