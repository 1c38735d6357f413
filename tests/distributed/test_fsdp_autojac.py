"""torchjd.distributed.fsdp_jac_to_grad after torchjd.autojac.backward or mtl_backward on a model
sharded by FSDP2 (``fully_shard``) between 2 and 4 gloo processes, each with its own share of the
batch: every rank's ``.grad`` shards hold the update of one process that forms the Jacobian of the
global batch's objectives by brute force and aggregates it."""

import itertools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import torchjd.autojac
from tests.distributed.problems import (
    AGGREGATORS,
    batch_of,
    mtl_losses,
    multi_task,
    outcome_of,
    per_sample_losses,
    regressor,
    share_of,
)
from torchjd.aggregation import Mean, UPGrad
from torchjd.distributed import fsdp_jac_to_grad

# iwrm: per-sample losses, backward, objectives="per_sample" (unequal local batches);
# iwrm_dim1: the same, with a matrix sharded along its columns, the parameters kept unsharded
# after the passes; mtl: mean task losses, mtl_backward, "shared"; tasks: the same losses,
# backward one row per pass through FSDP's hooks (every parameter gets the Jacobian), "shared"
PROBLEMS = ["iwrm", "iwrm_dim1", "mtl", "tasks"]
CASES = list(itertools.product(AGGREGATORS, PROBLEMS))
HSDP_CASES = list(itertools.product(AGGREGATORS, ["iwrm", "iwrm_dim1", "mtl"]))
Case = tuple[str, str]
Update = tuple[Tensor, list[Tensor]]  # the weights and every full gradient


def _model(problem: str) -> nn.Module:
    return regressor() if problem.startswith("iwrm") else multi_task()


def _shard(model: nn.Module, group: dist.ProcessGroup | None, dim1: bool = False) -> None:
    """``fully_shard`` on some layers, then on the model (which takes the other parameters),
    over ``group``, or, when None, HSDP on 4 ranks (2 replicas of 2 shards); with ``dim1``, a
    matrix along its columns, and the parameters kept unsharded between the passes."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = (
        init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        if group is None
        else DeviceMesh.from_group(group, "cpu")
    )
    options: dict[str, Any] = {"mesh": mesh}
    if dim1:  # (FSDP shards unevenly only along the first dimension)
        R = mesh.size(mesh.ndim - 1)
        even = lambda p: p.dim() == 2 and p.shape[1] % R == 0  # noqa: E731
        options["shard_placement_fn"] = lambda p: Shard(1) if even(p) else Shard(0)
        options["reshard_after_forward"] = False
    layers = [model[0]] if isinstance(model, nn.Sequential) else [model.trunk[0], model.trunk[2]]
    for layer in [*layers, model]:
        fully_shard(layer, **options)
        if dim1:  # kept unsharded after the backward pass too, until reshard()
            layer.set_reshard_after_backward(False)  # type: ignore[operator]


def _objectives(problem: str) -> str:
    return "per_sample" if problem.startswith("iwrm") else "shared"


def _backward(problem: str, model: nn.Module, X: Tensor, Y: Tensor) -> None:
    """Fills the ``.jac`` fields."""
    if problem.startswith("iwrm"):
        torchjd.autojac.backward(per_sample_losses(model, X, Y))
        return
    features, losses = mtl_losses(model, X, Y)
    if problem == "mtl":
        torchjd.autojac.mtl_backward(losses, features=features)
    else:
        torchjd.autojac.backward(losses, parallel_chunk_size=1)  # one pass per row


def _leftovers(model: nn.Module) -> list[str]:
    """What the call left on FSDP's unsharded parameters (seen by unsharding the model)."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    found = [f"{n}.jac" for n, p in model.named_parameters() if hasattr(p, "jac")]
    found += [f"{n}.grad" for n, p in model.named_parameters() if p.grad is not None]
    for module in sharded:
        module.reshard()
    return found


def _fsdp_step(case: Case, X: Tensor, Y: Tensor, group: dist.ProcessGroup | None) -> Any:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    name, problem = case
    model = _model(problem)
    _shard(model, group, dim1=problem == "iwrm_dim1")
    _backward(problem, model, X, Y)
    objectives = _objectives(problem)
    weights = fsdp_jac_to_grad(model, AGGREGATORS[name](), objectives=objectives)  # type: ignore[arg-type]
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # a no-op unless kept unsharded
    params = list(model.parameters())
    shards = all(isinstance(p.grad, DTensor) and p.grad.placements == p.placements for p in params)
    grads = [p.grad.full_tensor() for p in params]  # type: ignore[union-attr]
    dims = {p.placements[-1].dim for p in params}  # type: ignore[attr-defined]
    return (weights, grads), (shards, dims), _leftovers(model)


def _reference(case: Case, X: Tensor, Y: Tensor) -> Update:
    """One process, the whole model, the global batch: the Jacobian row by row with autograd,
    aggregated by the aggregator."""
    name, problem = case
    model = _model(problem)
    params = list(model.parameters())
    if problem.startswith("iwrm"):
        objectives, shared, specific = list(per_sample_losses(model, X, Y)), params, []
    else:
        _, objectives = mtl_losses(model, X, Y)
        specific = [] if problem == "tasks" else list(model.heads.parameters())
        shared = [p for p in params if all(p is not q for q in specific)]
    rows = [
        torch.cat(
            [
                g.flatten()
                for g in torch.autograd.grad(
                    o, shared, retain_graph=True, allow_unused=True, materialize_grads=True
                )
            ]
        )
        for o in objectives
    ]
    J = torch.stack(rows)
    aggregator = AGGREGATORS[name]()
    weights = aggregator.gramian_weighting(J @ J.T)
    update = aggregator(J)
    grads = dict(zip(shared, update.split([p.numel() for p in shared]), strict=True))
    if specific:  # each head's gradient of its task's loss
        head_grads = torch.autograd.grad(sum(objectives), specific)
        grads.update(zip(specific, head_grads, strict=True))
    return weights, [grads[p].view(p.shape) for p in params]


def _refusals(rank: int, group: dist.ProcessGroup) -> dict[str, Any]:
    """Bad calls, each on every rank (or on one), and what they left behind."""
    out: dict[str, Any] = {}
    X, Y = share_of("per_sample", rank, dist.get_world_size(group))

    def attempt(
        key: str, aggregator: Any, objectives: Any = "per_sample", hsdp: bool = False
    ) -> None:
        model = regressor()
        _shard(model, None if hsdp else group)
        _backward("iwrm", model, X, Y)
        out[key] = outcome_of(lambda: fsdp_jac_to_grad(model, aggregator, objectives=objectives))
        grads = [p.grad for p in model.parameters()]
        out[key, "left"] = _leftovers(model), grads

    attempt("mean", Mean())
    attempt("one_rank", Mean() if rank == 0 else UPGrad())
    attempt("objectives", UPGrad(), "both")
    attempt("hsdp_one_rank", Mean() if rank == 3 else UPGrad(), hsdp=True)  # 3: other replica

    model = multi_task()
    _shard(model, group)
    _, losses = mtl_losses(model, X, Y)
    torchjd.autojac.backward(losses[: 1 + rank % 2])  # a different number of objectives
    out["rows"] = outcome_of(lambda: fsdp_jac_to_grad(model, UPGrad(), objectives="shared"))
    out["rows", "left"] = _leftovers(model), [p.grad for p in model.parameters()]

    model = regressor()
    _shard(model, group)
    per_sample_losses(model, X, Y)  # no backward pass
    out["no_jac"] = outcome_of(lambda: fsdp_jac_to_grad(model, UPGrad(), objectives="per_sample"))

    plain = regressor()
    _backward("iwrm", plain, X, Y)
    out["plain"] = outcome_of(lambda: fsdp_jac_to_grad(plain, UPGrad(), objectives="per_sample"))

    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    partial = regressor()
    fully_shard(partial[0], mesh=DeviceMesh.from_group(group, "cpu"))  # not the model itself
    _backward("iwrm", partial, X, Y)
    out["partial"] = outcome_of(
        lambda: fsdp_jac_to_grad(partial, UPGrad(), objectives="per_sample")
    )
    out["partial", "left"] = _leftovers(partial[0])

    return out


def distributed_steps(rank: int, world_size: int) -> dict[Any, Any]:
    """The refusals on every rank, then every case on the 4 ranks and on the group of ranks 0
    and 1 (after the refusals: the group still works)."""
    world: dist.ProcessGroup = dist.group.WORLD  # type: ignore[assignment]
    results: dict[Any, Any] = {"refusals": _refusals(rank, world)}
    pair = dist.new_group([0, 1])
    for size, group in [(world_size, world), (2, pair)]:
        if rank < size:
            for case in CASES:
                X, Y = share_of(_objectives(case[1]), rank, size)
                results[size, case] = _fsdp_step(case, X, Y, group)
    for case in HSDP_CASES:  # on the 4 ranks
        X, Y = share_of(_objectives(case[1]), rank, world_size)
        results["hsdp", case] = _fsdp_step(case, X, Y, None)
    return results


@pytest.fixture
def distributed(four_ranks: list[Any]) -> list[Any]:
    return [result["fsdp_autojac"] for result in four_ranks]


@pytest.mark.parametrize(
    ("world_size", "case"),
    [*itertools.product([2, 4], CASES), *(("hsdp", case) for case in HSDP_CASES)],
    ids=lambda v: v if isinstance(v, str) else f"{v}ranks" if isinstance(v, int) else "-".join(v),
)
def test_equals_single_process_on_global_batch(
    distributed: list[Any], world_size: int | str, case: Case
) -> None:
    ranks = 4 if world_size == "hsdp" else world_size
    X, Y = batch_of(_objectives(case[1]), ranks)  # type: ignore[arg-type]
    expected_weights, expected_grads = _reference(case, X, Y)
    for result in distributed[:ranks]:
        (weights, grads), (shards, dims), leftovers = result[world_size, case]
        assert shards  # every .grad is a DTensor shard, placed as its parameter
        assert dims == ({0, 1} if case[1] == "iwrm_dim1" else {0})
        assert leftovers == []
        torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6)
        for grad, expected in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)


def test_non_gramian_aggregators_are_refused_on_every_rank(distributed: list[Any]) -> None:
    for rank, result in enumerate(distributed):
        outcomes = result["refusals"]
        assert outcomes["mean"][0] == "TypeError", outcomes["mean"]
        assert "must be a GramianWeightedAggregator" in outcomes["mean"][1]
        assert "use torchjd.distributed.jac_to_grad. Found Mean" in outcomes["mean"][1]
        expected = ("TypeError", "Found Mean") if rank == 0 else ("RuntimeError", "Another rank")
        assert outcomes["one_rank"][0] == expected[0], outcomes["one_rank"]
        assert expected[1] in outcomes["one_rank"][1]
        expected = ("TypeError", "Found Mean") if rank == 3 else ("RuntimeError", "Another rank")
        assert outcomes["hsdp_one_rank"][0] == expected[0], outcomes["hsdp_one_rank"]
        assert expected[1] in outcomes["hsdp_one_rank"][1]
        assert outcomes["objectives"][0] == "ValueError"
        assert "`objectives` must be one of ['per_sample', 'shared']" in outcomes["objectives"][1]


def test_every_rank_needs_the_same_objectives_with_shared(distributed: list[Any]) -> None:
    for result in distributed:
        outcome = result["refusals"]["rows"]
        assert outcome[0] == "ValueError", outcome
        assert "same number of `.jac` rows). Found, by rank: [1, 2, 1, 2]" in outcome[1]


def test_models_not_sharded_are_refused(distributed: list[Any]) -> None:
    for result in distributed:
        outcomes = result["refusals"]
        assert outcomes["plain"][0] == "TypeError"
        assert (
            "Under DistributedDataParallel, use torchjd.distributed.jac_to_grad"
            in (outcomes["plain"][1])
        )
        assert outcomes["no_jac"][0] == "ValueError"
        assert "No parameter of `module` has a `.jac` on any rank" in outcomes["no_jac"][1]
        assert outcomes["partial"][0] == "ValueError"
        assert "Found ['2.weight', '2.bias'] outside" in outcomes["partial"][1]


def test_nothing_is_left_behind_by_a_refusal(distributed: list[Any]) -> None:
    for result in distributed:
        outcomes = result["refusals"]
        for key in ["mean", "one_rank", "hsdp_one_rank", "objectives", "rows"]:
            leftovers, grads = outcomes[key, "left"]
            assert leftovers == [], key
            assert all(g is None for g in grads), key
        assert outcomes["partial", "left"] == []


def test_module_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"`module` must be a torch\.nn\.Module\. Found str"):
        fsdp_jac_to_grad("model", UPGrad(), objectives="shared")  # type: ignore[arg-type]
