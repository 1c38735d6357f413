r"""autogram across ranks: the Gramian of the global batch's objectives, from each layer's factors
(inputs and output gradients) or per-sample gradients gathered from every rank."""

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchjd.autogram import Engine
from torchjd.autogram._module_call import ModuleCall, shape_only
from torchjd.autogram._rules._conv import conv_rule
from torchjd.autogram._rules._embedding import embedding_rule
from torchjd.autogram._rules._generic import rows_by_recomputation
from torchjd.autogram._rules._linear import linear_rule
from torchjd.autogram._rules._norm import channel_norm_rule, layer_norm_rule
from torchjd.distributed._group import (
    all_gather_rows,
    exchange_shapes,
    failed_ranks_error,
    resolve_group,
)

# the rules that read only the call's main input, outputs and output gradients (and, for the
# normalisation layers, the module's running statistics, which DDP keeps equal on every rank):
# gathering those along the batch dimension gives them the samples of every rank
_FACTOR_RULES = (linear_rule, conv_rule, embedding_rule, layer_norm_rule, channel_norm_rule)


def compute_gramian(
    engine: Engine, output: Tensor, /, *, process_group: dist.ProcessGroup | None = None
) -> Tensor:
    r"""The Gramian :math:`G = J J^\top` of the objectives of every rank of ``process_group``, the
    same ``[M, M]`` matrix on every rank: what ``engine.compute_gramian`` gives in one process on
    the global batch.

    The objectives of rank :math:`r` are the ``output`` of its samples (along the engine's
    ``batch_dim``); the global objectives stack them in rank order. The cross blocks
    :math:`J_r J_s^\top` need the samples of both ranks, so each layer's factors, its inputs
    :math:`X` and output gradients :math:`\Gamma`, are all-gathered along the batch dimension
    before its rule: traffic of the order of the activations, not of the parameters. Then

    .. math::

        w = \mathcal W(G), \qquad \texttt{output.backward(}\,R\, w_r\texttt{)}

    on each rank, with :math:`w_r` its slice of :math:`w` (:func:`local_weights`), gives, once DDP
    (or FSDP2's ``fully_shard``, whose reduce-scatter also averages) averages the gradients over
    the :math:`R` ranks, :math:`\nabla_\theta\, w^\top \ell(\theta)`:
    the step of one process on the global batch. The cheaper alternative, where each rank weights
    only its own samples (``engine.compute_gramian(output)``, then ``output.backward(w)`` under
    DDP), exchanges nothing but gives no non-conflict guarantee across ranks.

    The rules of ``Linear``, convolutions, ``Embedding`` and the normalisation layers read only
    those factors (and the running statistics of an eval-mode ``BatchNorm``, which DDP keeps equal
    on every rank). The rules of the other modules (attention, recurrent layers, the generic rule,
    rules registered by the user) re-run the module on its inputs, which are not exchanged:
    instead, each rank forms the per-sample gradients :math:`J_{r,\ell}` (``[B_r R, P_\ell]``)
    of such a module :math:`\ell` by one re-run on its own samples (the exact generic rule), and
    their all-gather gives the block :math:`J_\ell J_\ell^\top`: traffic of the order of the
    module's number of parameters per objective, cheap for small modules but costly for large
    ones. Every rank must have the same modules, called in the same order, with inputs of the
    same shapes except along the batch dimension (whose sizes may differ).

    :param engine: The engine (with a ``batch_dim``) that recorded the forward pass of ``output``.
    :param output: This rank's objectives.
    :param process_group: The ranks (the default group when None).

    On one process (a group of size 1) it is ``engine.compute_gramian``; see the Engine's example:

    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torchjd.autogram import Engine
    >>> from torchjd.distributed import compute_gramian, local_weights
    >>> store = f"file://{tempfile.mkdtemp()}/store"
    >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    >>> model = torch.nn.Linear(2, 1)
    >>> engine = Engine(model, batch_dim=0)
    >>> losses = model(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).squeeze(dim=1)
    >>> compute_gramian(engine, losses)
    tensor([[ 6., 12.],
            [12., 26.]])
    >>> local_weights(torch.tensor([0.5, 0.5]), losses)
    tensor([0.5000, 0.5000])
    >>> losses.backward(local_weights(torch.tensor([0.5, 0.5]), losses))
    >>> dist.destroy_process_group()
    """
    if not isinstance(engine, Engine):
        raise TypeError(
            f"`engine` must be a torchjd.autogram.Engine. Found {type(engine).__name__}."
        )
    if engine._batch_dim is None:
        raise ValueError(
            "`engine` must have a batch dimension (Engine(..., batch_dim=0)): the ranks split the "
            "batch along it. Found batch_dim=None."
        )
    rerun = [module for module, (rule, _) in engine._rules.items() if rule not in _FACTOR_RULES]
    group = resolve_group(process_group)
    exchange = _Exchange(engine, group)
    rules = dict(engine._rules)
    engine._exchange_calls = exchange.calls
    for module in rerun:  # per-sample gradients instead of factors
        exchange.by_rows.add(module)
        engine._rules[module] = (exchange.gathered_rows_rule, rules[module][1])
    try:
        G = engine.compute_gramian(output)
    except Exception:
        if not exchange.reached:
            exchange_shapes(None, group)  # lets the other ranks raise too
        raise
    finally:
        engine._exchange_calls = None
        engine._rules.update(rules)
    if not exchange.reached:  # the engine had no objectives, and returned before the exchange
        exchange_shapes(None, group)
        raise ValueError(
            "Every rank must have at least one objective (one sample). Found `output` of shape "
            f"{tuple(output.shape)}."
        )
    return G


def local_weights(
    weights: Tensor,
    output: Tensor,
    /,
    *,
    batch_dim: int = 0,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor:
    r""":math:`R\, w_r`: this rank's part of the global ``weights`` (flattened like the global
    objectives), shaped like its ``output``, times the number of ranks :math:`R` (DDP averages the
    ranks' gradients). ``output.backward(local_weights(weights, output))`` then makes the step of
    one process on the global batch.

    :param weights: The weights ``[M]`` of the global objectives, the same on every rank.
    :param output: This rank's objectives.
    :param batch_dim: The batch dimension of ``output`` (the engine's).
    :param process_group: The ranks (the default group when None).
    """
    group = resolve_group(process_group)
    B = output.shape[batch_dim]
    shapes = exchange_shapes((B,), group)
    assert shapes is not None
    counts = [shape[0] for shape in shapes]
    global_shape = [
        sum(counts) if d == batch_dim % output.dim() else n for d, n in enumerate(output.shape)
    ]
    M = torch.Size(global_shape).numel()
    if weights.numel() != M:
        raise ValueError(
            f"`weights` must have one entry per global objective ({M}, the objectives of shape "
            f"{global_shape}). Found shape {tuple(weights.shape)}."
        )
    start = sum(counts[: dist.get_rank(group)])
    mine = weights.reshape(global_shape).narrow(batch_dim, start, B)
    return dist.get_world_size(group) * mine


class _Exchange:
    """The engine's hook that gives the calls of its factor rules the samples of every rank, and
    the rule of the other modules: their per-sample gradients, gathered."""

    def __init__(self, engine: Engine, group: dist.ProcessGroup) -> None:
        self.engine = engine
        self.group = group
        self.reached = False  # whether this rank reached the exchange
        self.counts: list[int] = []  # every rank's number of samples
        self.by_rows: set[nn.Module] = set()  # the modules that take gathered_rows_rule

    def calls(self, calls: dict[nn.Module, list[ModuleCall]], batch_dim: int, B: int) -> int:
        self.reached = True
        shapes = exchange_shapes((B,), self.group)
        if shapes is None:
            raise failed_ranks_error(self.group)
        self.counts = [shape[0] for shape in shapes]
        for module, module_calls in calls.items():
            if module in self.by_rows:
                continue
            for call in module_calls:
                _gather_factors(call, self.counts, self.group)
        return sum(self.counts)

    def gathered_rows_rule(self, module: nn.Module, calls: list[ModuleCall]) -> Tensor:
        r""":math:`J J^\top` with :math:`J` the rows of every rank's objectives (``[B R, P]``
        each, from a re-run of the module on this rank's samples), gathered in rank order."""
        covers_children = self.engine._rules[module][1]
        params = [p for p in module.parameters(recurse=covers_children) if p.requires_grad]
        J = rows_by_recomputation(module, calls, params)  # refuses sharded ones on every rank
        R = J.shape[0] // calls[0].num_samples
        J = all_gather_rows(J, [count * R for count in self.counts], self.group)
        return J @ J.T


def _gather_factors(call: ModuleCall, counts: list[int], group: dist.ProcessGroup) -> None:
    d = call.batch_dim
    assert d is not None
    call.grad_outputs = [
        _gather(call.grad_output(k), dim + 1, counts, group)  # type: ignore[operator]
        for k, dim in enumerate(call.output_batch_dims)
    ]
    call.outputs = [
        shape_only(out, (*out.shape[:dim], sum(counts), *out.shape[dim + 1 :]))
        for out, dim in zip(call.outputs, call.output_batch_dims, strict=True)
    ]
    call.args = (_gather(call.args[0], d, counts, group), *call.args[1:])


def _gather(tensor: Tensor, dim: int, counts: list[int], group: dist.ProcessGroup) -> Tensor:
    gathered = all_gather_rows(tensor.detach().movedim(dim, 0), counts, group)
    return gathered.movedim(0, dim)
