"""torchjd.distributed.compute_gramian and local_weights under FSDP2 (``fully_shard``, parameters
sharded between 2 and 4 gloo processes, each with its own share of the batch): the Gramian, the
weights and the gradients (gathered from the shards) of the engine in one process on the global
batch, as under DDP, since FSDP's reduce-scatter averages the gradients as DDP's all-reduce does."""

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from tests.distributed.problems import (
    global_batch,
    local_batches,
    outcome_of,
    per_sample_counts,
    two_objectives,
)
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine
from torchjd.distributed import compute_gramian, local_weights

Step = tuple[Tensor, Tensor, list[Tensor]]  # the Gramian, the weights and every full gradient


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1)]
    return nn.Sequential(*layers).double()


def _step(X: Tensor, Y: Tensor, group: dist.ProcessGroup | None) -> Step:
    """IWRM with two objectives per sample: under FSDP over ``group`` with the distributed
    Gramian, or in one process when ``group`` is None."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    engine = Engine(model, batch_dim=0)
    if group is not None:
        mesh = DeviceMesh.from_group(group, "cpu")
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    out = model(X).squeeze(-1)
    losses = two_objectives(out, Y)
    if group is None:
        gramian = engine.compute_gramian(losses)
        weights = UPGradWeighting()(gramian)
        losses.backward(weights.view(losses.shape))
    else:
        gramian = compute_gramian(engine, losses, process_group=group)
        weights = UPGradWeighting()(gramian)
        losses.backward(local_weights(weights, losses, process_group=group))
    engine.close()
    # a collective under FSDP: every rank gathers every gradient, in the same order
    grads = [getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for p in model.parameters()]
    return gramian, weights, grads


class _Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)
        self.bilinear = nn.Bilinear(4, 4, 1)  # no closed-form rule: its rule re-runs it

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear(x)
        return self.bilinear(h, h).squeeze(-1)


class _Attention(nn.Module):
    """Without ``bias_k``/``bias_v``, the attention rule reads the projections in the call's
    graph: nothing is re-run."""

    def __init__(self, add_bias_kv: bool = False) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, add_bias_kv=add_bias_kv, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = x.view(x.shape[0], -1, 4)
        return self.attention(h, h, h, need_weights=False)[0].sum(dim=(1, 2))


class _AttentionWithBiasKV(_Attention):
    """With ``bias_k``/``bias_v``, the attention rule forms per-sample gradients by re-running
    the module (vmap), not through the generic rule."""

    def __init__(self) -> None:
        super().__init__(add_bias_kv=True)


class _Recurrent(nn.Module):
    """The RNN rule re-runs the recurrence step by step, not through the generic rule."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 3, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x.view(x.shape[0], -1, 4))[0].sum(dim=(1, 2))


# the modules whose rules re-run them (each by another path), with the name in the message
RE_RUN = {"Bilinear": _Bilinear, "MultiheadAttention": _AttentionWithBiasKV, "RNN": _Recurrent}


def _rerun_refused(
    group: dist.ProcessGroup, model_type: type[nn.Module], plain: bool = False
) -> tuple[str, str] | str:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = model_type().double()
    with Engine(model, batch_dim=0) as engine:
        fully_shard(model, mesh=DeviceMesh.from_group(group, "cpu"))
        losses = model(torch.randn(2, 8, dtype=torch.float64))
        if plain:  # the engine alone, each rank on its own samples
            return outcome_of(lambda: engine.compute_gramian(losses))
        return outcome_of(lambda: compute_gramian(engine, losses, process_group=group))


def _own_samples_gramian(group: dist.ProcessGroup, rank: int) -> tuple[Tensor, Tensor]:
    """The engine alone on the attention read from its graph, under FSDP2 and without it."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model, reference = _Attention().double(), _Attention().double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    with Engine(reference, batch_dim=0) as engine:
        expected = engine.compute_gramian(reference(x))
    with Engine(model, batch_dim=0) as engine:
        fully_shard(model, mesh=DeviceMesh.from_group(group, "cpu"))
        return engine.compute_gramian(model(x)), expected


def distributed_steps(rank: int, world_size: int) -> dict[Any, Any]:
    results: dict[Any, Any] = {
        size: _step(X, Y, group) for size, group, X, Y in local_batches(rank, world_size)
    }
    world: dist.ProcessGroup = dist.group.WORLD  # type: ignore[assignment]
    results["attention"] = _own_samples_gramian(world, rank)
    for name, model_type in RE_RUN.items():
        results["refused", name] = _rerun_refused(world, model_type)
        results["refused_plain", name] = _rerun_refused(world, model_type, plain=True)
    return results


@pytest.fixture
def distributed(four_ranks: list[Any]) -> list[Any]:
    return [result["fsdp"] for result in four_ranks]


@pytest.mark.parametrize("world_size", [2, 4], ids=lambda r: f"{r}ranks")
def test_equals_single_process_on_global_batch(distributed: list[Any], world_size: int) -> None:
    X, Y = global_batch(sum(per_sample_counts(world_size)))
    expected_gramian, expected_weights, expected_grads = _step(X, Y, None)
    for gramian, weights, grads in [result[world_size] for result in distributed[:world_size]]:
        torch.testing.assert_close(gramian, expected_gramian, rtol=0, atol=1e-6)
        torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    assert expected_gramian.shape == (2 * X.shape[0], 2 * X.shape[0])


@pytest.mark.parametrize("name", RE_RUN)
def test_modules_that_are_re_run_are_refused(distributed: list[Any], name: str) -> None:
    for result in distributed:
        assert result["refused", name][0] == "ValueError", result["refused", name]
        assert f"those of {name} are sharded (DTensor" in result["refused", name][1]


@pytest.mark.parametrize("name", RE_RUN)
def test_modules_that_are_re_run_are_refused_by_the_engine_alone(
    distributed: list[Any], name: str
) -> None:
    for result in distributed:
        outcome = result["refused_plain", name]
        assert outcome[0] == "ValueError", outcome
        assert f"those of {name} are sharded (DTensor" in outcome[1]


def test_attention_read_from_its_graph_works_with_sharded_parameters(
    distributed: list[Any],
) -> None:
    for result in distributed:
        gramian, expected = result["attention"]
        torch.testing.assert_close(gramian, expected, rtol=0, atol=1e-10)
