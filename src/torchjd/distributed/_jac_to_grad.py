r"""``jac_to_grad`` across ranks: the global Jacobian, from the ranks' ``.jac`` fields, aggregated
identically on every rank."""

from collections.abc import Iterable
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor

from torchjd.aggregation import Aggregator, GramianWeightedAggregator
from torchjd.aggregation._bases import call_unchecked
from torchjd.autojac._accumulate import accumulate_grads
from torchjd.autojac._jac_to_grad import (
    _aggregate,
    _aggregate_by_blocks,
    _assemble,
    _can_skip_matrix,
    _common_dtype,
    _delete_jacs,
    _split,
    checked_inputs,
)
from torchjd.distributed._group import (
    all_gather_rows,
    exchange_shapes,
    failed_ranks_error,
    resolve_group,
)
from torchjd.linalg._gramian import symmetrized

Objectives = Literal["per_sample", "shared"]


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    objectives: Objectives,
    process_group: dist.ProcessGroup | None = None,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor | None:
    r"""Aggregates the global Jacobian of the ranks' ``.jac`` fields into the ``.grad`` fields,
    with the same result on every rank of ``process_group``: that of
    :func:`torchjd.autojac.jac_to_grad` in one process on the global batch.

    With :math:`R` ranks holding the local Jacobians :math:`J_1, \dots, J_R` (the ``.jac`` fields,
    as column blocks of one matrix each, see :func:`torchjd.autojac.jac_to_grad`), the global
    Jacobian is

    .. math::

        J = \begin{bmatrix} J_1 \\ \vdots \\ J_R \end{bmatrix}
        \quad (\texttt{objectives="per\_sample"}), \qquad
        J = \frac 1R \sum_{r=1}^R J_r \quad (\texttt{objectives="shared"}),

    and every rank adds :math:`\mathcal A(J)` to ``.grad``. Its Gramian is not the sum of the
    ranks' Gramians (cross terms :math:`J_r J_s^\top`), so the Jacobians themselves are exchanged:
    one all-gather of the rows, or one all-reduce of the matrix.

    With a :class:`~torchjd.aggregation.GramianWeightedAggregator` and
    ``optimize_gramian_computation=True``, no rank builds a Jacobian matrix. For ``"shared"``, each
    ``.jac`` block is averaged in place, then the Gramian is summed block by block. For
    ``"per_sample"``, the rows of one block at a time are gathered, to add
    :math:`J_{\cdot t} J_{\cdot t}^\top` to :math:`G`, and dropped; with the weights
    :math:`w = W(G)`, each rank computes the part :math:`w_r^\top J_r` of its own rows, and one
    all-reduce sums them: the peak memory is the local Jacobian plus one gathered block.

    :param tensors: The tensors (e.g. ``module.parameters()``) whose ``.jac`` to aggregate: the same
        ones, in the same order, on every rank.
    :param aggregator: The aggregator of the rows of :math:`J` (the same on every rank; a
        stateful or random one must be in the same state on every rank).
    :param objectives: ``"per_sample"`` when each rank's rows are objectives of their own (e.g. the
        per-sample losses of instance-wise risk minimization), ``"shared"`` when every rank's rows
        are the same objectives evaluated on its share of the data (e.g. the mean task losses of
        :func:`~torchjd.autojac.mtl_backward`, with equal local batch sizes).
    :param process_group: The ranks to aggregate over (the default group when None).
    :param retain_jac: Keep the ``.jac`` fields (deleted by default). They then hold the blocks of
        the global Jacobian, except with ``"per_sample"`` and the block-wise Gramian, where they
        keep the local rows.
    :param optimize_gramian_computation: Compute the Gramian block by block, as above.
    :returns: The weights of the global Jacobian's rows when the aggregator is a
        :class:`~torchjd.aggregation.WeightedAggregator`, else None.

    On one process (a group of size 1) it is :func:`torchjd.autojac.jac_to_grad`:

    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.autojac import backward
    >>> from torchjd.distributed import jac_to_grad
    >>> store = f"file://{tempfile.mkdtemp()}/store"
    >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> backward([param.pow(2).sum(), -param.sum()])
    >>> jac_to_grad([param], UPGrad(), objectives="per_sample")
    tensor([0.6500, 1.9984])
    >>> param.grad
    tensor([-0.6984,  0.6016])
    >>> dist.destroy_process_group()
    """
    check_objectives(objectives)
    group = resolve_group(process_group)
    try:
        params, jacobians = checked_inputs(tensors, aggregator, optimize_gramian_computation)
    except (TypeError, ValueError):
        exchange_shapes(None, group)  # lets the other ranks raise too
        raise
    m = jacobians[0].shape[0]
    n = sum(p.numel() for p in params)
    shapes = exchange_shapes((m, n), group)
    if shapes is None:
        raise failed_ranks_error(group)
    _check_consistent(shapes, objectives)
    counts = [shape[0] for shape in shapes]

    if optimize_gramian_computation:
        assert isinstance(aggregator, GramianWeightedAggregator)  # checked above
        if _can_skip_matrix(aggregator):
            if objectives == "shared":
                for i, p in enumerate(params):
                    # in place, so that a retained .jac holds the mean (a copy when the .jac is a
                    # strided view, e.g. of a matrix retained by a previous call)
                    jacobians[i] = jacobians[i].contiguous()
                    _average(jacobians[i], group)
                    p.jac = jacobians[i]  # type: ignore[attr-defined]
                weights = _aggregate_by_blocks(params, jacobians, aggregator)
            else:
                weights = _gathered_by_blocks(params, jacobians, aggregator, counts, group)
            if not retain_jac:
                _delete_jacs(params)
            return weights

    matrix = _assemble(params, jacobians)
    if objectives == "shared":
        _average(matrix, group)
    else:
        matrix = all_gather_rows(matrix, counts, group)
    weights, aggregation = _aggregate(matrix, aggregator)
    gradients = [b.view(p.shape) for p, b in zip(params, _split(aggregation, params), strict=True)]
    accumulate_grads(params, gradients)
    if retain_jac:
        blocks = torch.split(matrix, [p.numel() for p in params], dim=1)
        for p, block in zip(params, blocks, strict=True):
            p.jac = block.view(-1, *p.shape)  # type: ignore[attr-defined]
    else:
        _delete_jacs(params)
    return weights


def check_objectives(objectives: object) -> None:
    if objectives not in get_args(Objectives):
        raise ValueError(
            f"`objectives` must be one of {list(get_args(Objectives))}. Found {objectives!r}."
        )


def _check_consistent(shapes: list[tuple[int, ...]], objectives: Objectives) -> None:
    ns = [shape[1] for shape in shapes]
    if len(set(ns)) > 1:
        raise ValueError(
            "Every rank must aggregate the same parameters. Found these numbers of parameter "
            f"entries, by rank: {ns}."
        )
    ms = [shape[0] for shape in shapes]
    if objectives == "shared" and len(set(ms)) > 1:
        raise ValueError(
            'With objectives="shared", every rank must have the same objectives (the same number '
            f'of `.jac` rows). Found, by rank: {ms}. Use objectives="per_sample" if each rank '
            "has objectives of its own."
        )


def _average(tensor: Tensor, group: dist.ProcessGroup) -> None:
    dist.all_reduce(tensor, group=group)
    tensor.div_(dist.get_world_size(group))


def _gathered_by_blocks(
    params: list[Tensor],
    jacobians: list[Tensor],
    aggregator: GramianWeightedAggregator,
    counts: list[int],
    group: dist.ProcessGroup,
) -> Tensor:
    r""":math:`G = \sum_t J_{\cdot t} J_{\cdot t}^\top` from one gathered block at a time, then
    :math:`\sum_r w_r^\top J_r` by one all-reduce."""
    m = jacobians[0].shape[0]
    dtype = _common_dtype(jacobians)
    blocks = [J.reshape(m, -1).to(dtype) for J in jacobians]
    G = torch.zeros((sum(counts), sum(counts)), dtype=dtype, device=blocks[0].device)
    for J_t in blocks:
        gathered = all_gather_rows(J_t, counts, group)
        G.addmm_(gathered, gathered.T)
        del gathered
    weights = call_unchecked(aggregator.gramian_weighting, symmetrized(G))
    start = sum(counts[: dist.get_rank(group)])
    w_r = weights[start : start + m]
    local_part = torch.cat([w_r @ J_t for J_t in blocks])
    dist.all_reduce(local_part, group=group)
    gradients = [g.view(p.shape) for p, g in zip(params, _split(local_part, params), strict=True)]
    accumulate_grads(params, gradients)
    return weights
