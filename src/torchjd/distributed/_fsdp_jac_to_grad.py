r"""``fsdp_jac_to_grad``: autojac under FSDP2 (``fully_shard``). The Jacobians that autojac leaves
on the parameters that FSDP2 all-gathers for the forward pass are reduce-scattered (or exchanged
all-to-all) into the shards, whose Gramians sum to that of the global Jacobian."""

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchjd.aggregation import GramianWeightedAggregator
from torchjd.aggregation._bases import call_unchecked
from torchjd.autojac._jac_to_grad import _common_dtype
from torchjd.distributed._fsdp_shards import (
    ShardedParam,
    accumulate,
    by_destination,
    check_all_sharded,
    check_placements,
    clear,
    grad_of,
    group_of,
    jac_of,
    shards_of,
    take_grad,
    take_jac,
)
from torchjd.distributed._group import (
    FLOAT_DTYPES,
    agreed_dtype,
    all_gather_rows,
    collective_device,
    dtype_code,
    exchange_shapes,
    failed_ranks_error,
)
from torchjd.distributed._jac_to_grad import Objectives, check_objectives
from torchjd.distributed._sharded_jac_to_grad import check_gramian_aggregator
from torchjd.linalg._gramian import symmetrized


def fsdp_jac_to_grad(
    module: nn.Module,
    /,
    aggregator: GramianWeightedAggregator,
    *,
    objectives: Objectives,
) -> Tensor:
    r"""Aggregates the Jacobian that :func:`torchjd.autojac.backward` or
    :func:`~torchjd.autojac.mtl_backward` computed on a model sharded by FSDP2
    (``torch.distributed.fsdp.fully_shard``), each rank on its share of the batch: every rank's
    sharded parameters receive in ``.grad`` (a DTensor shard, as FSDP2 gives them to the
    optimizer) their part of the update of one process on the global batch.

    Under FSDP2, the forward pass uses parameters all-gathered from the shards, so autojac leaves
    each rank's Jacobian :math:`J_r` of its local objectives with respect to the whole
    (unsharded) parameters. The global Jacobian is, as for :func:`jac_to_grad`,

    .. math::

        J = \begin{bmatrix} J_1 \\ \vdots \\ J_R \end{bmatrix}
        \quad (\texttt{objectives="per\_sample"}), \qquad
        J = \frac 1R \sum_{r=1}^R J_r \quad (\texttt{objectives="shared"}).

    Rank :math:`s` needs only the columns :math:`J^{(s)}` of its shard: a reduce-scatter of the
    :math:`J_r` (``"shared"``), or an all-to-all of their column blocks (``"per_sample"``): the
    traffic of FSDP's reduce-scatter of the gradients, times the number of local rows. The
    Gramian is then the sum of the shards' Gramians (one all-reduce of an :math:`M \times M`
    matrix), and every rank computes the same weights:

    .. math::

        G = J J^\top = \sum_{s=1}^R J^{(s)} J^{(s)\top}, \qquad w = \mathcal W(G), \qquad
        \texttt{.grad} \mathrel{+}= w^\top J^{(s)} \ \text{on rank } s.

    Under HSDP (a 2-D mesh: the shards replicated between groups of ranks), the shard's columns
    are first exchanged within each group of ranks that shards, then all-reduced (``"shared"``)
    or all-gathered (``"per_sample"``, the rows of each replica in turn) between the replicas,
    and the Gramian is summed within the group: every rank of the mesh counts in :math:`R`.

    Only a :class:`~torchjd.aggregation.GramianWeightedAggregator` (UPGrad, MGDA, ...) can be
    used: no rank holds :math:`J`. For an aggregator that needs the Jacobian itself, replicate
    the parameters with ``DistributedDataParallel`` and use :func:`jac_to_grad`.

    The gradients that :func:`~torchjd.autojac.mtl_backward` gives the task-specific parameters
    (left by it on the unsharded parameters, which FSDP2 does not reduce) are reduce-scattered
    into the shards' ``.grad`` too: averaged over the ranks with ``"shared"`` (the gradient of
    the mean task losses on the global batch), summed with ``"per_sample"``.

    What the objectives are:

    - ``"per_sample"`` (instance-wise risk minimization): each rank's objectives are its own
      (e.g. the losses of its samples, after ``backward(losses)``); the global objectives are
      all of them, in the order of the ranks in the mesh. Ranks may have different numbers of
      objectives.
    - ``"shared"`` (multi-task learning): every rank has the same :math:`m` objectives, each the
      mean of a task's losses over its share of the batch (``mtl_backward(losses, features)``);
      the global objectives are the task losses averaged over the global batch, which are the
      means of the ranks' objectives when the ranks have equal local batch sizes (as
      ``DistributedSampler`` gives).

    Each rank holds the Jacobian of its objectives with respect to the whole model until this
    call (autojac computes it so), then only its shard's columns. The ``.jac`` fields are
    deleted, also when an error is raised (they live on FSDP's unsharded parameters, where they
    would be summed into the next step's).

    :param module: The model, on which ``fully_shard`` was applied (to the model itself, so that
        every parameter is sharded, and possibly to submodules), with the same mesh for every
        parameter: FSDP (``Shard(dim)`` over a 1-D mesh) or HSDP (``Replicate(), Shard(dim)``
        over a 2-D mesh).
    :param aggregator: A :class:`~torchjd.aggregation.GramianWeightedAggregator`, the same on
        every rank (a stateful or random one must be in the same state on every rank).
    :param objectives: ``"per_sample"`` or ``"shared"``, see above.
    :returns: The weights :math:`w` of the global objectives (``[M]``, the same on every rank).

    On one process (a group of size 1), it is :func:`torchjd.autojac.jac_to_grad`, with the
    gradients in DTensors (``tests/distributed/test_fsdp_autojac.py`` runs it on several):

    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> from torch.distributed.fsdp import fully_shard
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.autojac import backward
    >>> from torchjd.distributed import fsdp_jac_to_grad
    >>> store = f"file://{tempfile.mkdtemp()}/store"
    >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(2, 1)
    >>> _ = fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, -1.0]])
    >>> Y = torch.tensor([1.0, 0.0, 2.0])
    >>> backward((model(X).squeeze(dim=1) - Y).pow(2))  # one loss per sample
    >>> fsdp_jac_to_grad(model, UPGrad(), objectives="per_sample")
    tensor([1.2706, 0.4720, 0.3333])
    >>> type(model.weight.grad).__name__, model.weight.grad.full_tensor()
    ('DTensor', tensor([[0.4979, 1.2342]]))
    >>> dist.destroy_process_group()
    """
    shards = shards_of(module)
    try:
        return _aggregate(module, shards, aggregator, objectives)
    finally:
        clear(shards)  # consumed, or refused: never left for the next backward pass


def _aggregate(
    module: nn.Module,
    shards: list[ShardedParam],
    aggregator: GramianWeightedAggregator,
    objectives: Objectives,
) -> Tensor:
    check_placements(shards)  # the same model on every rank: they all raise
    group, replicas = group_of(shards)
    try:
        check_objectives(objectives)
        check_gramian_aggregator(aggregator)
        check_all_sharded(module, shards)
        local = _local_rows(shards)
    except (TypeError, ValueError):
        for among in _groups(group, replicas):  # lets the other ranks raise too
            exchange_shapes(None, among)
        raise
    counts, totals, dtype = _exchange(local, group, replicas, objectives)
    R = dist.get_world_size(group)
    ranks = R * len(totals)  # every rank of the mesh
    device = _device(shards, group)
    # which parameters hold a .jac, or a .grad from mtl_backward, on some rank (zeros elsewhere)
    held = torch.tensor(
        [[jac_of(s) is not None, grad_of(s) is not None] for s in shards], device=device
    ).to(torch.int64)
    for among in _groups(group, replicas):
        dist.all_reduce(held, op=dist.ReduceOp.MAX, group=among)
    with_jac = [s for s, h in zip(shards, held[:, 0].tolist(), strict=True) if h]
    with_grad = [s for s, h in zip(shards, held[:, 1].tolist(), strict=True) if h]

    m_r = counts[dist.get_rank(group)]
    send = by_destination(with_jac, take_jac, m_r, R, dtype, device)
    if objectives == "shared":
        J = _summed(send, counts[0], group, replicas).div_(ranks)
    else:
        J = _all_to_all(send, counts, group)
        if replicas is not None:  # the rows of the other replicas' ranks
            J = all_gather_rows(J, totals, replicas)
    del send  # (a view of it on one rank)
    G = J @ J.T
    dist.all_reduce(G, group=group)
    weights = call_unchecked(aggregator.gramian_weighting, symmetrized(G))
    accumulate(with_jac, weights @ J)

    if with_grad:
        send = by_destination(with_grad, take_grad, 1, R, dtype, device)
        g = _summed(send, 1, group, replicas)[0]
        accumulate(with_grad, g.div_(ranks) if objectives == "shared" else g)
    return weights


def _groups(
    group: dist.ProcessGroup, replicas: dist.ProcessGroup | None
) -> list[dist.ProcessGroup]:
    return [group] if replicas is None else [group, replicas]


def _exchange(
    local: tuple[int, int],
    group: dist.ProcessGroup,
    replicas: dist.ProcessGroup | None,
    objectives: Objectives,
) -> tuple[list[int], list[int], torch.dtype]:
    """The numbers of objectives of the ranks of ``group``, those of each replica (of the whole
    ``group``), and the dtype of the ``.jac`` fields; raises on every rank when a rank's
    arguments failed their checks or when they disagree (every rank makes the same exchanges)."""
    shapes = exchange_shapes(local, group)
    checked: tuple[list[int], torch.dtype] | None = None
    error: Exception | None = failed_ranks_error(group) if shapes is None else None
    if shapes is not None:
        try:
            checked = _check_consistent(shapes, objectives)
        except ValueError as raised:
            error = raised
    if replicas is None:
        if error is not None:
            raise error
        assert checked is not None
        return checked[0], [sum(checked[0])], checked[1]
    summary = None
    if checked is not None:
        summary = (sum(checked[0]), checked[0][0], FLOAT_DTYPES.index(checked[1]))
    table = exchange_shapes(summary, replicas)
    if error is not None:
        raise error
    if table is None:
        raise failed_ranks_error(replicas)
    assert checked is not None
    if len({row[2] for row in table}) > 1 or (
        objectives == "shared" and len({row[1] for row in table}) > 1
    ):
        raise ValueError(
            "Every replica must have `.jac` fields of the same objectives and dtype. Found, by "
            f"replica, (rows, rows of a rank, dtype code): {table}."
        )
    return checked[0], [row[0] for row in table], checked[1]


def _local_rows(shards: list[ShardedParam]) -> tuple[int, int]:
    """This rank's number of objectives and the dtype code of its ``.jac`` fields (``(0, -1)``
    when it holds none)."""
    jacobians = [(s, J) for s in shards if (J := jac_of(s)) is not None]
    if not jacobians:
        return 0, -1
    m = jacobians[0][1].shape[0]
    for shard, J in jacobians:
        expected = (m, *shard.param.shape)
        if tuple(J.shape) != expected:
            raise ValueError(
                f"The `.jac` of every parameter must have shape [m, *param.shape]. Found "
                f"{tuple(J.shape)} for `{shard.name}`, expected {expected}."
            )
    dtype = _common_dtype([J for _, J in jacobians])
    return m, dtype_code(dtype)


def _check_consistent(
    shapes: list[tuple[int, ...]], objectives: Objectives
) -> tuple[list[int], torch.dtype]:
    counts = [shape[0] for shape in shapes]
    held = [shape for shape in shapes if shape[0] > 0]
    if not held:
        raise ValueError(
            "No parameter of `module` has a `.jac` on any rank: call torchjd.autojac.backward or "
            "mtl_backward first."
        )
    if objectives == "shared":
        if len({shape[0] for shape in held}) > 1:
            raise ValueError(
                'With objectives="shared", every rank must have the same objectives (the same '
                f'number of `.jac` rows). Found, by rank: {counts}. Use objectives="per_sample" '
                "if each rank has objectives of its own."
            )
        counts = [held[0][0]] * len(shapes)
    requirement = "Every rank's `.jac` fields must have the same floating dtype."
    return counts, agreed_dtype([shape[1] for shape in held], requirement)


def _device(shards: list[ShardedParam], group: dist.ProcessGroup) -> torch.device:
    for shard in shards:
        J = jac_of(shard)
        if J is not None:
            return J.device
    return collective_device(group)


def _summed(
    send: Tensor, k: int, group: dist.ProcessGroup, replicas: dist.ProcessGroup | None
) -> Tensor:
    """``[k, B]``: the sum over every rank of their ``send[s]`` for this rank's shard :math:`s`
    (a reduce-scatter, then an all-reduce between the replicas)."""
    if send.shape[0] == 1:
        out = send[0]
    else:
        flat = send.new_empty(k * send.shape[2])
        # reduce_scatter_tensor is deprecated for reduce_scatter_single where torch has it
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        scatter(flat, send.contiguous().view(-1), group=group)
        out = flat.view(k, -1)
    if replicas is not None:
        dist.all_reduce(out, group=replicas)
    return out


def _all_to_all(send: Tensor, counts: list[int], group: dist.ProcessGroup) -> Tensor:
    """``[Σ counts, B]``: every rank's ``send[s]`` for this rank :math:`s`, in rank order."""
    if send.shape[0] == 1:
        return send[0]
    B = send.shape[2]
    out = send.new_empty(sum(counts) * B)
    dist.all_to_all_single(
        out,
        send.contiguous().view(-1),
        output_split_sizes=[c * B for c in counts],
        input_split_sizes=[send.shape[1] * B] * send.shape[0],
        group=group,
    )
    return out.view(-1, B)
