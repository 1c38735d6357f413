r"""autogram with the parameters sharded between the ranks: each rank's engine hooks its own
modules, every rank computes the same objectives, and the Gramian is the sum of the shards'."""

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor

from torchjd.autogram import Engine
from torchjd.distributed._group import (
    FLOAT_DTYPES,
    exchange_shapes,
    failed_ranks_error,
    resolve_group,
)


def sharded_compute_gramian(
    engine: Engine | None, output: Tensor, /, *, process_group: dist.ProcessGroup | None = None
) -> Tensor:
    r"""The Gramian ``[m, m]`` of the Jacobian of ``output`` with respect to the parameters of
    every rank's engine, the same matrix on every rank, when the ranks hold disjoint shards of
    the modules and compute the **same** ``m`` objectives (the same forward pass on the same
    batch).

    Rank :math:`r`'s engine hooks its shard of the modules, whose parameters make the columns
    :math:`J_r` of the full Jacobian :math:`J = [J_1 \cdots J_R]`. The Gramian is additive over
    the columns, so each rank computes its block with its own engine and one all-reduce of the
    :math:`m \times m` matrix sums them (the autogram counterpart of :func:`sharded_jac_to_grad`):

    .. math::

        G = J J^\top = \sum_{r=1}^R J_r J_r^\top, \qquad w = \mathcal W(G), \qquad
        \nabla_{\theta_r}\, w^\top \ell = w^\top J_r.

    Every rank then gets the same weights :math:`w` from :math:`G` and backpropagates them into
    its own shard: ``torch.autograd.backward(output, w.view_as(output), inputs=shard)``, or the
    fused :func:`sharded_backward`. The work of the rules (the costly part of the Gramian) is
    split between the ranks; the traffic is the :math:`m^2` entries of :math:`G`. After its
    optimizer step, each rank sends its updated shard to the others for the next forward pass
    (``torch.distributed.broadcast`` from the owner: see ``examples/sharded_autogram.py``).

    :param engine: This rank's engine, hooking its shard of the modules (disjoint from the other
        ranks'), or None on a rank that holds no module (its block is zero).
    :param output: The objectives, the same ones (same shape and dtype) on every rank.
    :param process_group: The ranks between which the modules are sharded (the default group when
        None).

    On one process (a group of size 1) the shard is the whole model; see the Engine's example:

    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torchjd.autogram import Engine
    >>> from torchjd.distributed import sharded_compute_gramian
    >>> store = f"file://{tempfile.mkdtemp()}/store"
    >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    >>> model = torch.nn.Linear(2, 1)
    >>> engine = Engine(model, batch_dim=0)
    >>> output = model(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).squeeze(dim=1)
    >>> sharded_compute_gramian(engine, output)
    tensor([[ 6., 12.],
            [12., 26.]])
    >>> dist.destroy_process_group()
    """
    group = resolve_group(process_group)
    try:
        _check(engine, output)
        if engine is None:
            G = output.new_zeros(output.numel(), output.numel())
        else:
            G = engine.compute_gramian(output)
    except Exception:
        exchange_shapes(None, group)  # lets the other ranks raise too
        raise
    return _summed_over_ranks(G, group)


def sharded_backward(
    engine: Engine | None,
    losses: Tensor,
    weighting: Callable[[Tensor], Tensor],
    /,
    *,
    process_group: dist.ProcessGroup | None = None,
    max_kept_bytes: int | None = None,
) -> Tensor:
    r"""The fused step of :meth:`Engine.backward <torchjd.autogram.Engine.backward>` with the
    modules sharded between the ranks as in :func:`sharded_compute_gramian`: the weights
    :math:`w = \mathcal W(G)` of the full Gramian :math:`G = \sum_r J_r J_r^\top` (one
    all-reduce), the same on every rank, and the gradient :math:`w^\top J_r` of
    :math:`w^\top \ell` accumulated into the ``.grad`` of this rank's shard.

    The engine's fused step also backpropagates into the leaves of the graph of ``losses`` that
    its modules do not cover: on each rank, the other ranks' parameters should not require grad
    (else this rank computes their gradient too, the same on every rank, for nothing). A rank
    without an engine computes only the weights.

    :param engine: This rank's engine, hooking its shard of the modules, or None on a rank that
        holds no module.
    :param losses: The objectives, the same ones (same shape and dtype) on every rank.
    :param weighting: A function from the Gramian ``[m, m]`` to the weights ``[m]``, e.g.
        :class:`~torchjd.aggregation.UPGradWeighting`; the same on every rank (a stateful or
        random one must be in the same state on every rank).
    :param process_group: The ranks between which the modules are sharded (the default group when
        None).
    :param max_kept_bytes: As for :meth:`Engine.backward <torchjd.autogram.Engine.backward>`.
    :returns: The weights :math:`w`, the same on every rank.

    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torchjd.aggregation import MeanWeighting
    >>> from torchjd.autogram import Engine
    >>> from torchjd.distributed import sharded_backward
    >>> store = f"file://{tempfile.mkdtemp()}/store"
    >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    >>> model = torch.nn.Linear(2, 1)
    >>> engine = Engine(model, batch_dim=0)
    >>> losses = model(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).squeeze(dim=1)
    >>> sharded_backward(engine, losses, MeanWeighting())
    tensor([0.5000, 0.5000])
    >>> model.weight.grad
    tensor([[2., 3.]])
    >>> dist.destroy_process_group()
    """
    group = resolve_group(process_group)
    reached = False  # whether this rank reached the exchange (else it tells the others it failed)

    def summed_weighting(G: Tensor) -> Tensor:
        nonlocal reached
        reached = True
        return weighting(_summed_over_ranks(G, group))

    try:
        _check(engine, losses)
        if not callable(weighting):
            raise TypeError(f"`weighting` must be callable. Found {type(weighting).__name__}.")
        if engine is not None:
            return engine.backward(losses, summed_weighting, max_kept_bytes=max_kept_bytes)
        weights = summed_weighting(losses.new_zeros(losses.numel(), losses.numel()))
    except Exception:
        if not reached:
            exchange_shapes(None, group)
        raise
    if not isinstance(weights, Tensor) or weights.shape != (losses.numel(),):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"`weighting` must return a vector of {losses.numel()} weights (one per element of "
            f"`losses`). Found {shape}."
        )
    return weights


def _check(engine: Engine | None, output: Tensor) -> None:
    if engine is not None and not isinstance(engine, Engine):
        raise TypeError(
            "`engine` must be a torchjd.autogram.Engine, or None on a rank that holds no module. "
            f"Found {type(engine).__name__}."
        )
    if not isinstance(output, Tensor):
        raise TypeError(f"The objectives must be a Tensor. Found {type(output).__name__}.")
    if output.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"The objectives must be floating point ({', '.join(map(str, FLOAT_DTYPES))}). Found "
            f"{output.dtype}."
        )


def _summed_over_ranks(G: Tensor, group: dist.ProcessGroup) -> Tensor:
    """:math:`\\sum_r G_r` on every rank, after checking that the ranks have the same objectives."""
    shapes = exchange_shapes((G.shape[0], FLOAT_DTYPES.index(G.dtype)), group)
    if shapes is None:
        raise failed_ranks_error(group)
    if len(set(shapes)) > 1:
        found = [(m, str(FLOAT_DTYPES[code])) for m, code in shapes]
        raise ValueError(
            "With sharded modules, every rank must compute the same objectives (the same number "
            f"of them, of the same dtype). Found, by rank (number, dtype): {found}."
        )
    G = G.contiguous()
    dist.all_reduce(G, group=group)
    return G
