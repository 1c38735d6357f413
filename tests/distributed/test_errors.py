"""Refusals of torchjd.distributed: a wrong argument on one rank makes every rank raise (none
waits forever), and leaves the ``.jac`` and ``.grad`` fields as they were."""

from typing import Any

import pytest
import torch

import torchjd.autojac
from tests.distributed.launch import run_on_ranks
from tests.distributed.problems import outcome_of, with_jac
from torchjd.aggregation import UPGrad, UPGradWeighting
from torchjd.autogram import Engine
from torchjd.distributed import (
    average_grads,
    compute_gramian,
    jac_to_grad,
    sharded_backward,
    sharded_compute_gramian,
)

COLLECTIVE_TIMEOUT_S = 5.0  # a rank that waits on a collective raises after that long


def test_needs_an_initialized_process_group() -> None:
    param = torch.ones(2, requires_grad=True)
    param.jac = torch.ones(1, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        jac_to_grad([param], UPGrad(), objectives="shared")
    with pytest.raises(RuntimeError, match="init_process_group"):
        average_grads([param])
    assert torch.equal(param.jac, torch.ones(1, 2))


def test_objectives_must_be_named() -> None:
    param = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"`objectives` must be one of \['per_sample', 'shared'\]"):
        jac_to_grad([param], UPGrad(), objectives="mean")  # type: ignore[arg-type]


def _scenarios(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    param = with_jac(2)
    tensors = [param] if rank == 0 else [torch.ones(3, requires_grad=True)]  # rank 1: no .jac
    out["no_jac"] = outcome_of(lambda: jac_to_grad(tensors, UPGrad(), objectives="per_sample"))

    param = with_jac(2 + rank)
    out["rows"] = outcome_of(lambda: jac_to_grad([param], UPGrad(), objectives="shared"))
    out["rows_jac_kept"] = torch.equal(param.jac, with_jac(2 + rank).jac) and param.grad is None

    param = with_jac(2, size=3 + rank)
    out["params"] = outcome_of(lambda: jac_to_grad([param], UPGrad(), objectives="per_sample"))

    param = torch.ones(3, requires_grad=True)
    param.grad = torch.ones(3) if rank == 0 else None
    out["grads"] = outcome_of(lambda: average_grads([param]))
    out["grads_kept"] = rank != 0 or torch.equal(param.grad, torch.ones(3))

    out["group"] = outcome_of(
        lambda: jac_to_grad([with_jac(1)], UPGrad(), objectives="shared", process_group="all")  # type: ignore[arg-type]
    )

    out.update(_sharded_engine_scenarios(rank))

    # the group still works after the refusals; rank 1's rows follow rank 0's in the .jac kept
    param = with_jac(1 + rank)
    jac_to_grad([param], UPGrad(), objectives="per_sample", retain_jac=True)
    out["retained"] = param.jac
    # the retained .jac of two parameters are strided views of one matrix: reduced all the same
    params = [with_jac(1 + rank, size=2), with_jac(1 + rank, size=3)]
    jac_to_grad(params, UPGrad(), objectives="per_sample", retain_jac=True)
    jac_to_grad(params, UPGrad(), objectives="shared", optimize_gramian_computation=True)
    out["views"] = [p.grad for p in params]

    def user_step() -> None:
        if rank == 1:  # rank 1 fails before the collective, then leaves the group
            raise KeyError("a bug in the user's code")
        jac_to_grad([with_jac(1)], UPGrad(), objectives="shared")

    out["hang"] = outcome_of(user_step)
    return out


def _sharded_engine_scenarios(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model = torch.nn.Linear(3, 1).double()
    engine = Engine(model, batch_dim=0)
    X = torch.ones(2 + rank, 3, dtype=torch.float64)
    out["sharded_rows"] = outcome_of(lambda: sharded_compute_gramian(engine, model(X)[:, 0]))
    out["sharded_rows_cleared"] = not engine._calls

    # rank 1's objectives do not depend on its shard
    losses = (model(X[:2]) if rank == 0 else X[:2, :1]).squeeze(1)
    out["sharded_unreached"] = outcome_of(
        lambda: sharded_backward(engine, losses, UPGradWeighting())
    )
    out["sharded_unreached_grad"] = model.weight.grad is None

    shard: Any = engine if rank == 0 else model  # rank 1: not an engine
    losses = model(X[:2]).squeeze(1)
    out["sharded_type"] = outcome_of(lambda: sharded_compute_gramian(shard, losses))
    engine.close()

    # rank 1's objectives do not depend on its engine's modules
    bilinear = torch.nn.Bilinear(3, 3, 1).double()  # re-run by its rule
    with Engine(model, bilinear, batch_dim=0) as two:
        rules = dict(two._rules)
        losses = (bilinear(X, model(X).expand(-1, 3)) if rank == 0 else X[:, :1]).squeeze(1)
        out["gramian_unreached"] = outcome_of(lambda: compute_gramian(two, losses))
        out["gramian_engine_restored"] = (
            two._rules == rules and two._exchange_calls is None and not two._calls
        )

        # rank 1 has no sample
        x = X if rank == 0 else X[:0]
        losses = bilinear(x, model(x).expand(-1, 3)).squeeze(1)
        out["gramian_empty"] = outcome_of(lambda: compute_gramian(two, losses))
        out["gramian_empty_cleared"] = not two._calls

    return out


@pytest.fixture(scope="module")
def outcomes() -> list[Any]:
    return run_on_ranks(_scenarios, 2, collective_timeout_s=COLLECTIVE_TIMEOUT_S)


def test_a_rank_without_jac_makes_every_rank_raise(outcomes: list[Any]) -> None:
    rank_0, rank_1 = outcomes[0]["no_jac"], outcomes[1]["no_jac"]
    assert rank_1[0] == "ValueError"
    assert "`tensors[0]` (shape (3,)) has no `.jac`" in rank_1[1]
    assert rank_0[0] == "RuntimeError"
    assert "Another rank" in rank_0[1]


def test_shared_objectives_need_the_same_rows(outcomes: list[Any]) -> None:
    for outcome in outcomes[:2]:
        assert outcome["rows"][0] == "ValueError"
        assert "the same number of `.jac` rows). Found, by rank: [2, 3]" in outcome["rows"][1]
        assert outcome["rows_jac_kept"]


def test_every_rank_needs_the_same_parameters(outcomes: list[Any]) -> None:
    for outcome in outcomes[:2]:
        assert outcome["params"][0] == "ValueError"
        assert "same parameters" in outcome["params"][1]
        assert "by rank: [3, 4]" in outcome["params"][1]


def test_average_grads_needs_grad_on_the_same_tensors(outcomes: list[Any]) -> None:
    for outcome in outcomes[:2]:
        assert outcome["grads"][0] == "ValueError"
        assert "`.grad` on the same ones" in outcome["grads"][1]
        assert outcome["grads_kept"]


def test_process_group_type(outcomes: list[Any]) -> None:
    for outcome in outcomes[:2]:
        assert outcome["group"][0] == "TypeError"
        assert "`process_group` must be a torch.distributed.ProcessGroup" in outcome["group"][1]


def test_retained_jac_is_the_global_jacobian(outcomes: list[Any]) -> None:
    expected = torch.cat([with_jac(1).jac, with_jac(2).jac])
    for outcome in outcomes[:2]:
        assert torch.equal(outcome["retained"], expected)


def test_a_rank_that_raises_does_not_hang_the_others(outcomes: list[Any]) -> None:
    assert outcomes[1]["hang"] == ("KeyError", '"a bug in the user\'s code"')
    assert outcomes[0]["hang"] != "returned"  # a timeout or a closed connection: not a hang


def test_retained_views_can_be_aggregated_again(outcomes: list[Any]) -> None:
    params = [with_jac(1, size=2), with_jac(1, size=3)]
    second = [with_jac(2, size=2), with_jac(2, size=3)]
    for p, q in zip(params, second, strict=True):
        p.jac = torch.cat([p.jac, q.jac])
    torchjd.autojac.jac_to_grad(params, UPGrad())
    for outcome in outcomes[:2]:
        for grad, p in zip(outcome["views"], params, strict=True):
            # two steps on the same global Jacobian
            torch.testing.assert_close(grad, 2 * p.grad, rtol=0, atol=1e-9)


def test_sharded_engine_refusals(outcomes: list[Any]) -> None:
    for outcome in outcomes:
        assert outcome["sharded_rows"][0] == "ValueError"
        assert "every rank must compute the same objectives" in outcome["sharded_rows"][1]
        assert "[(2, 'torch.float64'), (3, 'torch.float64')]" in outcome["sharded_rows"][1]
        assert outcome["sharded_rows_cleared"]
        assert outcome["sharded_unreached_grad"]
    assert outcomes[1]["sharded_unreached"][0] == "ValueError"
    assert "does not depend on the trainable parameters" in outcomes[1]["sharded_unreached"][1]
    assert outcomes[1]["sharded_type"][0] == "TypeError"
    assert "`engine` must be a torchjd.autogram.Engine, or None" in outcomes[1]["sharded_type"][1]
    for key in ["sharded_unreached", "sharded_type"]:
        assert outcomes[0][key][0] == "RuntimeError"
        assert "Another rank" in outcomes[0][key][1]


def test_compute_gramian_refusals() -> None:
    model = torch.nn.Linear(3, 1)
    with pytest.raises(TypeError, match=r"`engine` must be a torchjd\.autogram\.Engine"):
        compute_gramian(model, torch.ones(2))  # type: ignore[arg-type]
    with (
        Engine(model, batch_dim=None) as engine,
        pytest.raises(ValueError, match="must have a batch dimension"),
    ):
        compute_gramian(engine, torch.ones(2))


def test_compute_gramian_failing_on_one_rank(outcomes: list[Any]) -> None:
    assert outcomes[1]["gramian_unreached"][0] == "ValueError"
    assert "does not depend on the trainable parameters" in outcomes[1]["gramian_unreached"][1]
    assert outcomes[0]["gramian_unreached"][0] == "RuntimeError"
    assert "Another rank" in outcomes[0]["gramian_unreached"][1]
    for outcome in outcomes:
        # the engine is left as it was: the rules restored, the hook removed, the calls cleared
        assert outcome["gramian_engine_restored"]
        assert outcome["gramian_empty_cleared"]
    assert outcomes[1]["gramian_empty"] == (
        "ValueError",
        "Every rank must have at least one objective (one sample). Found `output` of shape (0,).",
    )
    assert outcomes[0]["gramian_empty"][0] == "RuntimeError"
    assert "Another rank" in outcomes[0]["gramian_empty"][1]
