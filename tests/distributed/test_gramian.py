"""torchjd.distributed.compute_gramian and local_weights under DDP on 2 and 4 gloo processes: the
Gramian and the weighted step of the autogram engine on the global batch in one process."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.distributed.problems import (
    global_batch,
    local_batches,
    per_sample_counts,
    regressor,
    rows_of,
    two_objectives,
)
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine
from torchjd.distributed import average_grads, compute_gramian, local_weights

Step = tuple[Tensor | None, Tensor, list[Tensor]]  # the Gramian, the weights and every .grad


def _conv() -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 1)).double()
    return model, lambda X: X.unsqueeze(1)  # [B, 1, 5]


def _embedding() -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(4, 2), nn.Flatten(), nn.Linear(10, 1)).double()
    return model, lambda X: (X > 0).long() + (X > 1).long()  # [B, 5] indices, some repeated


def _norms() -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    torch.manual_seed(0)
    layers = [
        nn.Conv1d(1, 4, 2),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm1d(4, affine=True),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 4),
        nn.LayerNorm(4),
        nn.Tanh(),
        nn.RMSNorm(4),
        nn.Linear(4, 1),
    ]
    return nn.Sequential(*layers).double(), lambda X: X.unsqueeze(1)  # [B, 1, 5]


class _Rerun(nn.Module):
    """Modules whose rules re-run them: attention, a GRU, and one without a rule (Bilinear)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(1, 2)
        self.attention = nn.MultiheadAttention(2, 1, batch_first=True)
        self.gru = nn.GRU(2, 2, batch_first=True)
        self.bilinear = nn.Bilinear(2, 2, 1)

    def forward(self, X: Tensor) -> Tensor:
        h = torch.tanh(self.embed(X.unsqueeze(-1)))  # [B, 5, 2]: a sequence of 5 steps
        h, _ = self.attention(h, h, h, need_weights=False)
        h, _ = self.gru(h)
        return self.bilinear(h[:, -1], h[:, -1])


def _rerun() -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    torch.manual_seed(0)
    return _Rerun().double(), lambda X: X


MODELS: dict[str, Callable[[], tuple[nn.Module, Callable[[Tensor], Tensor]]]] = {
    "mlp": lambda: (regressor(), lambda X: X),
    "conv": _conv,
    "embedding": _embedding,
    "norms": _norms,
    "rerun": _rerun,
}

CHEAP_MODE_MODELS = ["mlp", "norms"]


def _step(
    kind: str, X: Tensor, Y: Tensor, group: dist.ProcessGroup | None, mode: str = "exact"
) -> Step:
    """IWRM with two objectives per sample through the engine: under DDP over ``group`` with the
    distributed Gramian (``"exact"``), with each rank's own Gramian (``"cheap"``: the cheaper
    mode), or that mode with the fused step inside ``no_sync()`` then ``average_grads``
    (``"fused"``: no Gramian returned), or in one process when ``group`` is None."""
    model, inputs = MODELS[kind]()
    engine = Engine(model, batch_dim=0)
    if mode == "fused":
        assert group is not None
        module = DDP(model, process_group=group)
        with module.no_sync():
            losses = two_objectives(module(inputs(X)).squeeze(-1), Y)
            weights = engine.backward(losses, UPGradWeighting())
        average_grads(model.parameters(), process_group=group)
        engine.close()
        return None, weights, [p.grad for p in model.parameters()]
    module = model if group is None else DDP(model, process_group=group)
    out = module(inputs(X)).squeeze(-1)
    losses = two_objectives(out, Y)
    exact = group is not None and mode == "exact"
    gramian = (
        compute_gramian(engine, losses, process_group=group)
        if exact
        else engine.compute_gramian(losses)
    )
    weights = UPGradWeighting()(gramian)
    if exact:
        losses.backward(local_weights(weights, losses, process_group=group))
    else:
        losses.backward(weights.view(losses.shape))
    engine.close()
    return gramian, weights, [p.grad for p in model.parameters()]


def distributed_steps(rank: int, world_size: int) -> dict[tuple[Any, ...], Step]:
    results: dict[tuple[Any, ...], Step] = {}
    for size, group, X, Y in local_batches(rank, world_size):
        for kind in MODELS:
            results[size, kind] = _step(kind, X, Y, group)
        for kind in CHEAP_MODE_MODELS:
            for mode in ("cheap", "fused"):
                results[size, kind, mode] = _step(kind, X, Y, group, mode)
    return results


@pytest.fixture
def distributed(four_ranks: list[Any]) -> list[Any]:
    return [result["autogram"] for result in four_ranks]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("world_size", [2, 4], ids=lambda r: f"{r}ranks")
def test_equals_single_process_on_global_batch(
    distributed: list[Any], world_size: int, kind: str
) -> None:
    X, Y = global_batch(sum(per_sample_counts(world_size)))
    expected = _step(kind, X, Y, None)
    results = [result[world_size, kind] for result in distributed[:world_size]]
    for gramian, weights, grads in results:
        torch.testing.assert_close(gramian, expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(weights, expected[1], rtol=0, atol=1e-6)
        for grad, expected_grad in zip(grads, expected[2], strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    assert expected[0].shape == (2 * X.shape[0], 2 * X.shape[0])


def _cheap_mode_reference(kind: str, world_size: int) -> list[Tensor]:
    """:math:`\\frac 1R \\sum_r w_r^\\top J_r` with :math:`w_r` the UPGrad weights of
    :math:`J_r J_r^\\top`, from each rank's Jacobian formed row by row with autograd."""
    counts = per_sample_counts(world_size)
    X, Y = global_batch(sum(counts))
    model, inputs = MODELS[kind]()
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for rank in range(world_size):
        rows = rows_of(rank, counts)
        losses = two_objectives(model(inputs(X[rows])).squeeze(-1), Y[rows]).flatten()
        J = torch.stack(
            [
                torch.cat(
                    [g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]
                )
                for loss in losses
            ]
        )
        w = UPGradWeighting()(J @ J.T)
        step = (w @ J).split([p.numel() for p in params])
        for t, g, p in zip(total, step, params, strict=True):
            t += g.view(p.shape) / world_size
    return total


@pytest.mark.parametrize("kind", CHEAP_MODE_MODELS)
@pytest.mark.parametrize("world_size", [2, 4], ids=lambda r: f"{r}ranks")
def test_cheap_mode_weights_each_rank_by_its_own_gramian(
    distributed: list[Any], world_size: int, kind: str
) -> None:
    expected = _cheap_mode_reference(kind, world_size)
    exact = distributed[0][world_size, kind][2]
    for result in distributed[:world_size]:
        gramian, weights, grads = result[world_size, kind, "cheap"]
        assert gramian.shape == (weights.numel(), weights.numel())  # this rank's objectives only
        for grad, expected_grad in zip(grads, expected, strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    # it is not the step of the global batch
    difference = max((g - e).abs().max() for g, e in zip(grads, exact, strict=True))
    assert difference > 1e-3, difference


@pytest.mark.parametrize("kind", CHEAP_MODE_MODELS)
@pytest.mark.parametrize("world_size", [2, 4], ids=lambda r: f"{r}ranks")
def test_fused_step_in_no_sync_then_average_grads_is_the_cheap_mode(
    distributed: list[Any], world_size: int, kind: str
) -> None:
    # The fused step writes .grad outside autograd (DDP's reducer does not see it): averaged by
    # average_grads, it is the cheaper mode's step.
    expected = _cheap_mode_reference(kind, world_size)
    for result in distributed[:world_size]:
        grads = result[world_size, kind, "fused"][2]
        for grad, expected_grad in zip(grads, expected, strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
