"""torchjd.distributed.sharded_jac_to_grad on 2 gloo processes, each holding a shard of the
parameters and the Jacobian of the same losses with respect to it, gives the shards of the update
of torchjd.autojac.jac_to_grad in one process on the full Jacobian."""

import itertools
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.func import functional_call

import torchjd.autojac
from tests.distributed.launch import run_on_ranks
from tests.distributed.problems import (
    AGGREGATORS,
    global_batch,
    outcome_of,
    per_sample_losses,
    regressor,
    with_jac,
)
from torchjd.aggregation import Aggregator, Mean, UPGrad
from torchjd.distributed import sharded_jac_to_grad

BATCH = 5
# the entries of the flat parameter vector (29) that each rank owns, by number of ranks
FLAT_BOUNDS = {2: [0, 13, 29], 4: [0, 7, 13, 22, 29]}
ALL = {"0.weight", "0.bias", "2.weight", "2.bias"}
OWNED = {  # the tensors that each rank owns
    "subsets": [{"0.weight"}, ALL - {"0.weight"}],
    "empty_shard": [set(), ALL],  # rank 0 holds nothing
}
SHARDINGS = ["flat", "subsets", "empty_shard"]
CASES = list(itertools.product(AGGREGATORS, SHARDINGS))
COLLECTIVE_TIMEOUT_S = 5.0


def _losses(values: dict[str, Tensor]) -> Tensor:
    """The per-sample losses of the regressor with these parameter values."""
    X, Y = global_batch(BATCH)
    model = regressor()
    return per_sample_losses(lambda x: functional_call(model, values, (x,)), X, Y)


def _full_values() -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in regressor().named_parameters()}


def _sharded_step(
    rank: int, name: str, sharding: str, world_size: int = 2
) -> tuple[Tensor, list[Tensor]]:
    """This rank's weights and the ``.grad`` of its shard."""
    values = _full_values()
    if sharding == "flat":
        flat = torch.cat([v.flatten() for v in values.values()])
        start, stop = FLAT_BOUNDS[world_size][rank : rank + 2]
        shard = flat[start:stop].clone().requires_grad_()
        full = torch.cat([flat[:start], shard, flat[stop:]])
        sizes = [v.numel() for v in values.values()]
        values = {
            key: piece.view(v.shape)
            for (key, v), piece in zip(values.items(), full.split(sizes), strict=True)
        }
        tensors = [shard]
    else:
        tensors = []
        for key in sorted(OWNED[sharding][rank]):
            values[key].requires_grad_()
            tensors.append(values[key])
    if tensors:  # a rank without a shard has no Jacobian to compute
        torchjd.autojac.backward(_losses(values), inputs=tensors)
    weights = sharded_jac_to_grad(tensors, AGGREGATORS[name]())
    return weights, [t.grad for t in tensors]


class _Custom(Aggregator):
    def forward(self, matrix: Tensor) -> Tensor:
        return matrix.sum(dim=0)


def _scenarios(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {case: _sharded_step(rank, *case) for case in CASES}

    param = with_jac(2)
    out["mean"] = outcome_of(lambda: sharded_jac_to_grad([param], Mean()))  # type: ignore[arg-type]
    out["mean_kept"] = hasattr(param, "jac") and param.grad is None
    out["custom"] = outcome_of(lambda: sharded_jac_to_grad([param], _Custom()))  # type: ignore[arg-type]
    aggregator = UPGrad() if rank == 0 else Mean()
    out["one_rank"] = outcome_of(lambda: sharded_jac_to_grad([param], aggregator))  # type: ignore[arg-type]
    hooked = UPGrad()
    hooked.register_forward_hook(lambda *_: None)
    out["hooked"] = outcome_of(lambda: sharded_jac_to_grad([param], hooked))

    param = with_jac(2 + rank)
    out["rows"] = outcome_of(lambda: sharded_jac_to_grad([param], UPGrad()))
    out["rows_kept"] = torch.equal(param.jac, with_jac(2 + rank).jac) and param.grad is None

    out["all_empty"] = outcome_of(lambda: sharded_jac_to_grad([], UPGrad()))

    param = with_jac(2)
    param.jac = param.jac.float() if rank == 1 else param.jac
    out["dtype"] = outcome_of(lambda: sharded_jac_to_grad([param], UPGrad()))

    # the group still works after the refusals
    param = with_jac(2)
    param.jac = param.jac.pow(1 + rank)  # rank 1's shard: the squares of rank 0's
    aggregator = UPGrad()
    seen: list[Tensor] = []  # the hooks of the Gramian weighting run, on the full Gramian
    aggregator.gramian_weighting.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    sharded_jac_to_grad([param], aggregator, retain_jac=True)
    out["after"] = (param.grad, hasattr(param, "jac"), seen)
    return out


@pytest.fixture(scope="module")
def outcomes() -> list[Any]:
    return run_on_ranks(_scenarios, 2, collective_timeout_s=COLLECTIVE_TIMEOUT_S)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_equals_single_process_on_full_jacobian(outcomes: list[Any], case: tuple[str, str]) -> None:
    name, sharding = case
    model = regressor()
    params = dict(model.named_parameters())
    torchjd.autojac.backward(_losses(params))
    expected_weights = torchjd.autojac.jac_to_grad(list(params.values()), AGGREGATORS[name]())
    if sharding == "flat":
        flat = torch.cat([p.grad.flatten() for p in params.values()])
        bounds = FLAT_BOUNDS[2]
        expected = [[flat[bounds[r] : bounds[r + 1]]] for r in range(2)]
    else:
        expected = [[params[key].grad for key in sorted(OWNED[sharding][r])] for r in range(2)]
    weights_0 = outcomes[0][case][0]
    for rank in range(2):
        weights, grads = outcomes[rank][case]
        assert torch.equal(weights, weights_0)  # the same weights on every rank, bit for bit
        torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-10)
        for grad, reference in zip(grads, expected[rank], strict=True):
            torch.testing.assert_close(grad, reference, rtol=0, atol=1e-10)


def distributed_steps(rank: int, world_size: int) -> dict[str, tuple[Tensor, list[Tensor]]]:
    """The flat sharding on 4 ranks (within the launch of 4 ranks of conftest.py)."""
    return {name: _sharded_step(rank, name, "flat", world_size) for name in AGGREGATORS}


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_flat_shards_on_four_ranks(four_ranks: list[Any], name: str) -> None:
    model = regressor()
    params = list(model.parameters())
    torchjd.autojac.backward(_losses(dict(model.named_parameters())))
    expected_weights = torchjd.autojac.jac_to_grad(params, AGGREGATORS[name]())
    flat = torch.cat([p.grad.flatten() for p in params])
    bounds = FLAT_BOUNDS[4]
    for rank, result in enumerate(four_ranks):
        weights, (grad,) = result["sharded_autojac"][name]
        assert torch.equal(weights, four_ranks[0]["sharded_autojac"][name][0])
        torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-10)
        torch.testing.assert_close(grad, flat[bounds[rank] : bounds[rank + 1]], rtol=0, atol=1e-10)


def test_non_gramian_aggregators_are_refused_on_every_rank(outcomes: list[Any]) -> None:
    for outcome in outcomes:
        for key, found in [("mean", "Found Mean"), ("custom", "Found _Custom")]:
            assert outcome[key][0] == "TypeError"
            assert "`aggregator` must be a GramianWeightedAggregator" in outcome[key][1]
            assert found in outcome[key][1]
        assert outcome["mean_kept"]
        assert outcome["hooked"][0] == "ValueError"
        assert "without forward hooks" in outcome["hooked"][1]
    assert outcomes[1]["one_rank"][0] == "TypeError"
    assert outcomes[0]["one_rank"][0] == "RuntimeError"
    assert "Another rank" in outcomes[0]["one_rank"][1]


def test_every_rank_needs_the_same_objectives(outcomes: list[Any]) -> None:
    for outcome in outcomes:
        assert outcome["rows"][0] == "ValueError"
        assert "same number of `.jac` rows). Found, by rank: [2, 3]" in outcome["rows"][1]
        assert outcome["rows_kept"]
        assert outcome["dtype"][0] == "ValueError"
        assert "['torch.float64', 'torch.float32']" in outcome["dtype"][1]
        assert outcome["all_empty"][0] == "ValueError"
        assert "`tensors` is empty on every rank" in outcome["all_empty"][1]


def test_the_group_works_after_the_refusals(outcomes: list[Any]) -> None:
    full = torch.ones(6, dtype=torch.float64, requires_grad=True)
    full.jac = torch.cat([with_jac(2).jac, with_jac(2).jac.pow(2)], dim=1)
    G = full.jac @ full.jac.T
    torchjd.autojac.jac_to_grad([full], UPGrad())
    for rank, outcome in enumerate(outcomes):
        grad, kept, seen = outcome["after"]
        assert kept
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], G, rtol=0, atol=1e-10)
        torch.testing.assert_close(grad, full.grad[3 * rank : 3 * rank + 3], rtol=0, atol=1e-10)
