r"""The rule of a group of hooked modules that share parameters (tied weights, e.g. a language
model's output ``Linear`` whose weight is its ``Embedding``'s).

The row of objective :math:`(i, r)` w.r.t. a parameter :math:`p` used by the modules :math:`M` of
the group is :math:`\sum_M J^p_{M, ir}`, the sum of each module's contribution (from its recorded
calls), so the Gramian has cross terms between the modules, which their own rules, each summing
its own calls, cannot give. With :math:`S = \sum_M J^{\text{shared}}_M` the rows w.r.t. the
parameters used by several modules of the group, and :math:`J^{\text{own}}_M` those w.r.t. the
parameters that only :math:`M` uses,

.. math::

    G = S S^\top + \sum_M J^{\text{own}}_M {J^{\text{own}}_M}^\top,

each module's rows coming from its recorded calls: in closed form for a stock ``Linear``
(:math:`\Gamma_{ir}^\top X_i` and the sum of :math:`\Gamma_{ir}` over the positions) and a stock
``Embedding`` (the rows of :math:`\Gamma_{ir}` added at the looked-up indices), by re-running the
module for any other (:func:`~torchjd.autogram._rules._generic.rows_by_recomputation`). Memory:
:math:`S` is ``[B R, P_shared]`` (for a head tied to an embedding of ``V`` tokens of size ``d``,
``V d`` numbers per objective), held while each module's rows ``[B R, P_M]`` are formed in turn.

The most common group, a stock ``Embedding`` and a stock ``Linear`` whose weight is the table (a
language model's head), has a path without these rows: the blocks of the two modules' own rules
plus the cross terms between them, in closed form (see ``_embedding_head_gramian``).
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchjd.autogram._module_call import (
    ModuleCall,
    cat,
    positions,
    samples_first,
    samples_objectives_first,
)
from torchjd.autogram._registry import find_rule
from torchjd.autogram._rules._embedding import _scale, embedding_rule
from torchjd.autogram._rules._generic import rows_by_recomputation
from torchjd.autogram._rules._linear import linear_rule


def tied_group_gramian(
    members: Sequence[tuple[nn.Module, Sequence[ModuleCall], list[Tensor]]],
    shared: Sequence[Tensor],
) -> Tensor:
    """The Gramian ``[B R, B R]`` w.r.t. the trainable parameters of a group of modules.

    :param members: Each module of the group with its recorded calls (their output gradients
        filled) and its trainable parameters (each once; recursively for a module whose rule
        covers its children). A module called no time is left out.
    :param shared: The trainable parameters that several of the modules use, each once.
    """
    G = _embedding_head_gramian(members, shared)
    if G is not None:
        return G
    shared_ids = {id(p): k for k, p in enumerate(shared)}
    # One dtype for the rows (under autocast, those of a re-run module take the dtype of its
    # output gradients, the closed forms that of the parameters): the parameters' widest.
    dtype = shared[0].dtype
    for _, _, params in members:
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
    offsets = [0]
    for p in shared:
        offsets.append(offsets[-1] + p.numel())
    S: Tensor | None = None
    for module, calls, params in members:
        own = [p for p in params if id(p) not in shared_ids]
        tied = [p for p in params if id(p) in shared_ids]
        rows = member_rows(module, calls, own + tied).to(dtype)  # [B R, P_own + P_tied]
        num_own = sum(p.numel() for p in own)
        if num_own:
            block = rows[:, :num_own]
            G = block @ block.T if G is None else G.addmm_(block, block.T)
        if S is None:
            S = rows.new_zeros(rows.shape[0], offsets[-1])
        start = num_own
        for p in tied:
            k = shared_ids[id(p)]
            S[:, offsets[k] : offsets[k + 1]] += rows[:, start : start + p.numel()]
            start += p.numel()
        del rows
    assert S is not None
    return S @ S.T if G is None else G.addmm_(S, S.T)


def _embedding_head_gramian(
    members: Sequence[tuple[nn.Module, Sequence[ModuleCall], list[Tensor]]],
    shared: Sequence[Tensor],
) -> Tensor | None:
    r"""The Gramian of a stock ``Embedding`` and a stock ``Linear`` whose weight is the table,
    without the rows of the table (None for any other group): the blocks of the two modules'
    own rules plus the cross terms

    .. math::

        \langle J^E_{ir}, J^L_{js} \rangle = \sum_{t, u} c_{it}\,
        \Gamma^L_{jsu}[x_{it}]\, (\gamma^E_{irt} \cdot h_{ju})

    (``t``: the embedding's positions, looking up :math:`x_{it}`, :math:`c_{it}` as in
    ``_embedding.py``: zero at the padding index, the inverse frequency with
    ``scale_grad_by_freq``; ``u``: the head's positions, of inputs :math:`h_{ju}` and output
    gradients :math:`\Gamma^L_{jsu}`), ``[B, R, U, B, T]`` numbers twice in place of :math:`V d`
    per objective: None also when :math:`B T U > V d`, where the rows take less memory (a small
    vocabulary, long sequences)."""
    if len(members) != 2 or len(shared) != 1:
        return None
    (emb, emb_calls, _), (head, head_calls, _) = sorted(
        members, key=lambda member: not isinstance(member[0], nn.Embedding)
    )
    if (
        not _has_rule(emb, embedding_rule)
        or not _has_rule(head, linear_rule)
        or head.weight is not emb.weight
        or shared[0] is not emb.weight
    ):
        return None
    lookups = _plain_calls(emb_calls, shared[0].dtype)
    inputs = _plain_calls(head_calls, shared[0].dtype)
    if not lookups or not inputs:
        return None
    T = sum(x[0].numel() for x, _ in lookups)
    U = sum(g.shape[2] for _, g in inputs)
    if lookups[0][0].shape[0] * T * U > emb.num_embeddings * emb.embedding_dim:  # type: ignore[operator]
        return None  # the rows of the table take less memory
    index = cat([x.reshape(x.shape[0], -1) for x, _ in lookups], dim=1)  # [B, T]
    gamma = cat([_scaled(emb, x, g) for x, g in lookups], dim=2)  # [B, R, T, d]
    H = cat([positions(x, 1) for x, _ in inputs], dim=1)  # [B, U, d]
    Gamma = cat([g for _, g in inputs], dim=2)  # [B, R, U, V]
    B, R = gamma.shape[:2]
    at_lookups = Gamma.index_select(3, index.reshape(-1)).reshape(B, R, U, B, T)  # [j,s,u,i,t]
    dots = torch.einsum("irtd,jud->irtju", gamma, H.to(gamma.dtype))
    cross = torch.einsum("jsuit,irtju->irjs", at_lookups, dots).reshape(B * R, B * R)
    G = embedding_rule(emb, emb_calls) + linear_rule(head, head_calls)
    return G + cross + cross.T


def member_rows(module: nn.Module, calls: Sequence[ModuleCall], params: list[Tensor]) -> Tensor:
    """The rows ``[B R, P]`` of the Jacobian w.r.t. ``params`` (flattened in their order) from the
    calls of ``module``, as :func:`rows_by_recomputation` gives them."""
    grads = None
    if _has_rule(module, linear_rule):
        grads = _linear_rows(module, calls)  # type: ignore[arg-type]
    elif _has_rule(module, embedding_rule):
        grads = _embedding_rows(module, calls)  # type: ignore[arg-type]
    if grads is None or any(id(p) not in grads for p in params):  # e.g. a parametrisation
        return rows_by_recomputation(module, calls, params)
    return torch.cat([grads[id(p)] for p in params], dim=1)


def _linear_rows(module: nn.Linear, calls: Sequence[ModuleCall]) -> dict[int, Tensor] | None:
    """The per-objective gradients ``[B R, numel]`` of the weight and bias, by id, summed over the
    calls; None for a call that the closed form does not fit."""
    weight: Tensor | None = None
    bias: Tensor | None = None
    for x, Gamma in _plain_calls(calls, module.weight.dtype) or []:
        X = positions(x, 1)  # [B, T, d_in]
        B, R = Gamma.shape[:2]
        w = torch.einsum("brto,bti->broi", Gamma, X).reshape(B * R, -1)
        weight = w if weight is None else weight + w
        if module.bias is not None:
            b = Gamma.sum(dim=2).reshape(B * R, -1)
            bias = b if bias is None else bias + b
    if weight is None:
        return None
    rows = {id(module.weight): weight}
    if bias is not None:
        rows[id(module.bias)] = bias
    return rows


def _embedding_rows(module: nn.Embedding, calls: Sequence[ModuleCall]) -> dict[int, Tensor] | None:
    """The per-objective gradients ``[B R, numel]`` of the table, summed over the calls; None for
    a call that the closed form does not fit. A ``max_norm`` changes nothing: the lookup
    renormalises the table's rows in place, outside the graph, so the gradient w.r.t. the table is
    that of a lookup of the renormalised rows (re-running the module would renormalise again, and
    bump the table's version, which the graph of ``losses`` saved)."""
    table: Tensor | None = None
    for index, Gamma in _plain_calls(calls, module.weight.dtype) or []:
        B, R, T, d = Gamma.shape
        Gamma = _scaled(module, index, Gamma)
        index = index.reshape(B, T)
        spread = index[:, None, :, None].expand(B, R, T, d)
        rows = Gamma.new_zeros(B, R, module.num_embeddings, d).scatter_add_(2, spread, Gamma)
        rows = rows.reshape(B * R, -1)
        table = rows if table is None else table + rows
    return None if table is None else {id(module.weight): table}


def _scaled(module: nn.Embedding, index: Tensor, Gamma: Tensor) -> Tensor:
    r"""The output gradients ``[B, R, T, d]`` of one call times :math:`c_{it}` (see
    ``_embedding.py``), from its index with the samples first."""
    if module.padding_idx is None and not module.scale_grad_by_freq:
        return Gamma
    scale = _scale(module, index, 0, Gamma.dtype)  # [B, T]
    return Gamma * scale[:, None, :, None]


def _plain_calls(
    calls: Sequence[ModuleCall], dtype: torch.dtype
) -> list[tuple[Tensor, Tensor]] | None:
    """For each call that reached the objectives, its input with the samples first and its output
    gradients ``[B, R, T, features]``, floating-point ones in ``dtype`` (the parameters': under
    autocast, a Linear layer's input and output gradients are in the lower precision); None unless
    every call took one positional tensor and gave one output, with its samples along a dimension
    other than the last (the features)."""
    pairs = []
    for call in calls:
        if call.kwargs or len(call.args) != 1 or len(call.grad_outputs) != 1:
            return None
        x, gamma = call.args[0], call.grad_outputs[0]
        if not isinstance(x, Tensor):
            return None
        floating = x.is_floating_point()
        if call.batch_dim is not None and call.batch_dim >= x.dim() - floating:
            return None
        if gamma is not None:
            Gamma = samples_objectives_first(gamma.to(dtype), call.batch_dim)
            x = x.to(dtype) if floating else x
            pairs.append((samples_first(x, call.batch_dim), positions(Gamma, 2)))
    return pairs


def fuses_from_recorded(rule: object) -> bool:
    """Whether the ``weighted_gradients`` of ``rule`` (the one that the registry gives a module:
    the generic rule for a class or instance with its own ``forward``) gives the gradients of a
    module from its calls' recorded inputs and output gradients alone (not from what the rule
    saved while running): then the fused step can take them for a module of a tie group, whose
    own rule did not run. The rules of ``Linear`` and ``Embedding``."""
    return rule is linear_rule or rule is embedding_rule


def _has_rule(module: nn.Module, rule: object) -> bool:
    """Whether the registry gives ``module`` the built-in ``rule`` (not the generic one, for a
    class or an instance that computes otherwise: see ``find_rule``)."""
    entry = find_rule(module)
    return entry is not None and entry.rule is rule
