r"""``sharded_jac_to_grad``: the parameters are split between the ranks (FSDP-style sharding), every
rank holds the Jacobian of the same objectives with respect to its own shard."""

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator
from torchjd.aggregation._bases import _Composition, call_unchecked
from torchjd.autojac._accumulate import accumulate_grads
from torchjd.autojac._jac_to_grad import _common_dtype, _delete_jacs, checked_inputs
from torchjd.distributed._group import (
    agreed_dtype,
    collective_device,
    dtype_code,
    exchange_shapes,
    failed_ranks_error,
    resolve_group,
)
from torchjd.linalg._gramian import gramian, symmetrized


def sharded_jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: GramianWeightedAggregator,
    *,
    process_group: dist.ProcessGroup | None = None,
    retain_jac: bool = False,
) -> Tensor:
    r"""Aggregates a Jacobian whose columns are sharded between the ranks of ``process_group``:
    each rank adds to the ``.grad`` of its own tensors their part of the aggregation of the full
    Jacobian, as :func:`torchjd.autojac.jac_to_grad` would in one process holding every shard.

    Rank :math:`r` holds the Jacobian :math:`J_r` (``[m, n_r]``, the ``.jac`` fields of
    ``tensors``) of the **same** :math:`m` objectives with respect to its shard of the parameters,
    so that the full Jacobian is :math:`J = [J_1 \cdots J_R]` and its Gramian is the sum of the
    shards' Gramians. Only a :class:`~torchjd.aggregation.GramianWeightedAggregator` (weights
    :math:`w = W(G)`), such as UPGrad or MGDA, can be aggregated this way:

    .. math::

        G = J J^\top = \sum_{r=1}^R J_r J_r^\top, \qquad w = W(G), \qquad
        \mathcal A(J) = w^\top J = [w^\top J_1 \cdots w^\top J_R].

    One all-reduce of the :math:`m \times m` matrix :math:`G` is the only traffic (besides a few
    integers that check the arguments); every rank computes the same :math:`w` and writes
    :math:`w^\top J_r` into its own ``.grad`` fields. No rank builds more than its own shard.

    The shards may be any disjoint split of the parameters: a subset of the parameter tensors per
    rank, or a flat slice of them, as in FSDP (this function uses no FSDP internals: it only needs
    plain tensors with their ``.jac``). With FSDP's flat parameters, rank :math:`r`'s ``.jac`` is
    the slice of the flat Jacobian ``[m, numel]`` (padding columns zero) that its local shard
    covers, of the same :math:`m` objectives as on the other ranks. When each rank also computes
    its losses on its own data (FSDP's data parallelism), that slice is the reduce-scatter of the
    ranks' flat Jacobians when the objectives are shared (their mean, e.g. for mean task losses),
    which FSDP does for ``.grad`` but not for ``.jac``: do it with
    ``torch.distributed.reduce_scatter_tensor`` on the ``[m, numel]`` matrices, then call this
    function on the local shards. (With per-sample objectives, each rank's rows of every shard
    are needed instead: an all-to-all.) For a model sharded by FSDP2 (``fully_shard``),
    :func:`fsdp_jac_to_grad` does all this.

    :param tensors: This rank's shard: the tensors whose ``.jac`` to aggregate (they may differ, in
        number and shapes, between ranks; empty on a rank that holds no parameters).
    :param aggregator: A :class:`~torchjd.aggregation.GramianWeightedAggregator`, the same on every
        rank (a stateful or random one must be in the same state on every rank). Forward hooks on
        the aggregator itself cannot run, since no rank has :math:`J`, and are refused; those of
        its :attr:`~torchjd.aggregation.GramianWeightedAggregator.gramian_weighting` run.
    :param process_group: The ranks between which the parameters are sharded (the default group
        when None).
    :param retain_jac: Keep the ``.jac`` fields (deleted by default).
    :returns: The weights :math:`w` (``[m]``, the same on every rank).

    On one process (a group of size 1) the shard is the whole Jacobian:

    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.autojac import backward
    >>> from torchjd.distributed import sharded_jac_to_grad
    >>> store = f"file://{tempfile.mkdtemp()}/store"
    >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> backward([param.pow(2).sum(), -param.sum()])
    >>> sharded_jac_to_grad([param], UPGrad())
    tensor([0.6500, 1.9984])
    >>> param.grad
    tensor([-0.6984,  0.6016])
    >>> dist.destroy_process_group()
    """
    group = resolve_group(process_group)
    if not isinstance(tensors, Tensor) and isinstance(tensors, Iterable):
        tensors = list(tensors)
    try:
        check_gramian_aggregator(aggregator)
        if isinstance(tensors, list) and not tensors:  # this rank's shard is empty
            params, jacobians = [], []
        else:
            params, jacobians = checked_inputs(tensors, aggregator, False)
    except (TypeError, ValueError):
        exchange_shapes(None, group)  # lets the other ranks raise too
        raise
    assert isinstance(aggregator, GramianWeightedAggregator)  # checked above
    local = (0, -1)  # no rows, no dtype: the other ranks' are used
    if jacobians:
        local = (jacobians[0].shape[0], dtype_code(_common_dtype(jacobians)))
    shapes = exchange_shapes(local, group)
    if shapes is None:
        raise failed_ranks_error(group)
    m, dtype = _check_consistent(shapes)
    blocks = [J.reshape(m, -1).to(dtype) for J in jacobians]
    G = torch.zeros((m, m), dtype=dtype, device=_device(jacobians, group))
    for J_r in blocks:
        G.addmm_(J_r, J_r.T)
    dist.all_reduce(G, group=group)
    weights = call_unchecked(aggregator.gramian_weighting, symmetrized(G))
    gradients = [(weights @ J_r).view(p.shape) for p, J_r in zip(params, blocks, strict=True)]
    accumulate_grads(params, gradients)
    if not retain_jac:
        _delete_jacs(params)
    return weights


def _device(jacobians: list[Tensor], group: dist.ProcessGroup) -> torch.device:
    """Where the Gramian is: with the Jacobians, or, on a rank without any, where the backend
    takes tensors (NCCL: the current CUDA device)."""
    return jacobians[0].device if jacobians else collective_device(group)


def check_gramian_aggregator(aggregator: Aggregator) -> None:
    if not isinstance(aggregator, GramianWeightedAggregator):
        raise TypeError(
            "`aggregator` must be a GramianWeightedAggregator (one whose weights depend only on "
            "the Gramian J Jᵀ, such as UPGrad() or MGDA()): with sharded parameters, only the "
            "Gramian of the full Jacobian can be formed. To aggregate with another aggregator, "
            "replicate the parameters (DistributedDataParallel) and use "
            f"torchjd.distributed.jac_to_grad. Found {type(aggregator).__name__}."
        )
    composition = aggregator.weighting
    standard = (
        type(aggregator).forward is WeightedAggregator.forward
        and type(composition) is _Composition
        and composition.fn is gramian
    )
    hooks = any(
        module._forward_hooks or module._forward_pre_hooks for module in (aggregator, composition)
    )
    if not standard or hooks:
        raise ValueError(
            "`aggregator` must aggregate as W(J Jᵀ)ᵀ J, without forward hooks of its own: with "
            "sharded parameters, no rank holds J to call it on. Found "
            f"{type(aggregator).__name__} with "
            f"{'forward hooks' if hooks else 'a custom forward'}; register hooks on its "
            "`gramian_weighting` instead."
        )


def _check_consistent(shapes: list[tuple[int, ...]]) -> tuple[int, torch.dtype]:
    """The common number of rows and dtype of the ranks that hold a shard."""
    held = [shape for shape in shapes if shape[0] > 0]
    if not held:
        raise ValueError("`tensors` is empty on every rank: at least one rank must hold a shard.")
    ms = [shape[0] for shape in held]
    if len(set(ms)) > 1:
        raise ValueError(
            "With sharded parameters, every rank must hold the Jacobian of the same objectives "
            f"(the same number of `.jac` rows). Found, by rank: {[s[0] for s in shapes]}."
        )
    requirement = (
        "With sharded parameters, every rank's `.jac` fields must have the same floating dtype "
        "(the Gramians are summed)."
    )
    return ms[0], agreed_dtype([shape[1] for shape in held], requirement)
