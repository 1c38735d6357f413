r"""``MultiheadAttention``: its four projections are linear layers.

With :math:`Q = X_q W_q^\top + b_q`, :math:`K = X_k W_k^\top + b_k`, :math:`V = X_v W_v^\top + b_v`
and :math:`Y = O W_o^\top + b_o` (where :math:`O` is the concatenated heads'
:math:`\mathrm{softmax}(Q K^\top / \sqrt{d} + M) V`), the Gramian is the sum of the Linear blocks
(see ``_linear.py``) of the projections, each with its input and the objectives' gradients
w.r.t. its output.

While the engine records a call, the rule finds the projections' matrix products in the call's
autograd graph (see ``_graph_linear.py``): their saved inputs are :math:`X_q, X_k, X_v, O`, and
the engine's single backward pass also gives the gradients w.r.t. their outputs. Nothing is
re-run, and every option (masks, attention weights, dropout, ``kdim``/``vdim``, unbatched inputs)
is exact, since the gradients are those of the call itself. With ``bias_k``/``bias_v``, or when
the graph is not the expected one (frozen projections, a module called with different
query/key/value identities), the rule falls back to re-running the attention on the recorded
inputs with the projections exposed (torch's own ``multi_head_attention_forward`` with identity
projections does the masking) and one more backward pass for the gradients w.r.t.
:math:`Q, K, V`; with ``bias_k``/``bias_v`` it forms per-sample gradients instead (see
``_per_sample.py``); with dropout in training mode, it uses the exact masked-cotangent rule.

Its forward uses its child ``out_proj``'s parameters without calling ``out_proj``, so this rule
covers the children.

For the fused step, each projection's gradient is that of a Linear layer for the weighted output
gradients :math:`\bar\Gamma_{Q,i} = \sum_r w_{ir} \Gamma_{Q,ir}`, ...
(:math:`\nabla_{W_q} = \sum_i \bar\Gamma_{Q,i}^\top X_{q,i}`, ...). On the re-running path, calls
with dropout, ``bias_k``/``bias_v`` or attention weights that reach the objectives are left to
autograd.
"""

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from torchjd.autogram import _onednn as onednn
from torchjd.autogram._batched_grad import batched_grad
from torchjd.autogram._module_call import (
    ModuleCall,
    dropout_draws_random,
    gram,
    positions,
    samples_first,
    samples_objectives_first,
    saved_tensor_hooks_active,
    weighted,
)
from torchjd.autogram._rules._generic import gramian_by_recomputation, refuse_sharded
from torchjd.autogram._rules._graph_linear import (
    GraphLinear,
    find_graph_linears,
    graph_linear_gramian,
    graph_linear_weighted_gradients,
)
from torchjd.autogram._rules._linear import weight_gramian
from torchjd.autogram._rules._per_sample import per_sample_jacobian


def attention_rule(module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
    assert isinstance(module, nn.MultiheadAttention)
    linears = _recorded_projections(calls)
    if linears is not None:
        return graph_linear_gramian(calls, linears, _recorded_bias_of(calls), module)
    refuse_sharded(module, module.parameters())  # every path below re-runs the module
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if any(module.dropout > 0 and call.training for call in calls):
        return gramian_by_recomputation(module, calls, list(params.values()))
    if module.bias_k is not None or module.bias_v is not None or _tied(module):
        if any(_has_per_head_mask(module, call) for call in calls):
            return gramian_by_recomputation(module, calls, list(params.values()))
        return _per_sample_gramian(module, calls, params)
    inputs: list[list[Tensor]] = [[], [], [], []]  # X_q, X_k, X_v, O: [B, T, d_in] each
    grads: list[list[Tensor]] = [[], [], [], []]  # Γ w.r.t. Q, K, V, Y: [B, R, T, E] each
    for call in calls:
        arguments = _arguments(module, call)
        exposed, heads, outputs = _rerun(module, arguments)
        selected = [k for k, g in enumerate(call.grad_outputs) if g is not None]
        gammas = list(
            batched_grad(
                [outputs[call.output_leaf_indices[k]] for k in selected],
                exposed,
                [call.grad_outputs[k] for k in selected],  # type: ignore[misc]
            )
        )
        gamma_Y = call.grad_output(0) if call.output_leaf_indices[0] == 0 else None
        if gamma_Y is not None and module.batch_first and heads.dim() == 3:
            gamma_Y = gamma_Y.transpose(1, 2)  # sequence-first, as the heads O
        gammas.append(gamma_Y)
        dims = [call.batch_dim] * 3 + [None if call.batch_dim is None else 1]
        x = [arguments["query"], arguments["key"], arguments["value"], heads.detach()]
        call.saved["projections"] = (x, gammas, dims)  # for the fused step
        for j in range(4):
            gamma = gammas[j]
            if gamma is None:
                shape = exposed[j].shape if j < 3 else heads.shape
                gamma = heads.new_zeros(call.num_objectives_per_sample, *shape)
            inputs[j].append(positions(samples_first(x[j], dims[j]), 1))
            grads[j].append(positions(samples_objectives_first(gamma, dims[j]), 2))
    X = [torch.cat(parts, dim=1) for parts in inputs]
    Gamma = [torch.cat(parts, dim=2) for parts in grads]
    G: Tensor | int = 0
    for j, weight in enumerate(_weights(module)):
        if weight.requires_grad:
            G = G + weight_gramian(X[j].unsqueeze(0), Gamma[j].unsqueeze(0))
    if module.in_proj_bias is not None and module.in_proj_bias.requires_grad:
        G = G + gram(torch.cat([Gamma[j].sum(dim=2) for j in range(3)], dim=2))
    if module.out_proj.bias is not None and module.out_proj.bias.requires_grad:
        G = G + gram(Gamma[3].sum(dim=2))
    return G  # type: ignore[return-value]


def attention_weighted_gradients(
    module: nn.Module, calls: Sequence[ModuleCall], W: Tensor
) -> list[tuple[Tensor, Tensor]] | None:
    """The gradients of the weighted objectives w.r.t. the trainable parameters of ``module``,
    or None (see above).

    :param W: The weights ``[B, R]`` of the objectives.
    """
    assert isinstance(module, nn.MultiheadAttention)
    linears = _recorded_projections(calls)
    if linears is not None:
        return graph_linear_weighted_gradients(calls, linears, _recorded_bias_of(calls), W)
    if (
        module.bias_k is not None
        or module.bias_v is not None
        or _tied(module)
        or any(module.dropout > 0 and call.training for call in calls)
        or any(call.output_leaf_indices[0] != 0 for call in calls)
        or any(g is not None for call in calls for g in call.grad_outputs[1:])
    ):
        return None
    weight_grads: list[Tensor | int] = [0, 0, 0, 0]  # W_q, W_k, W_v, W_o
    bias_grads: list[Tensor | int] = [0, 0, 0, 0]
    for call in calls:
        x, gammas, dims = call.saved["projections"]  # Γ w.r.t. Q, K, V, Y; O sequence-first
        for j in range(4):
            if gammas[j] is None:
                continue
            gamma = weighted(gammas[j], dims[j], W)
            gamma = gamma.reshape(-1, gamma.shape[-1])
            weight_grads[j] = weight_grads[j] + gamma.T @ x[j].reshape(-1, x[j].shape[-1])
            bias_grads[j] = bias_grads[j] + gamma.sum(dim=0)
    full = [
        torch.zeros_like(w) if isinstance(g, int) else g
        for w, g in zip(_weights(module), weight_grads, strict=True)
    ]
    full_bias = [
        w.new_zeros(w.shape[0]) if isinstance(g, int) else g
        for w, g in zip(full, bias_grads, strict=True)
    ]
    if module._qkv_same_embed_dim:
        projections = [module.in_proj_weight]
        full[:3] = [torch.cat(full[:3], dim=0)]
    else:
        projections = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
    pairs = [*zip([*projections, module.out_proj.weight], full, strict=True)]
    if module.in_proj_bias is not None:
        pairs.append((module.in_proj_bias, torch.cat(full_bias[:3], dim=0)))
    if module.out_proj.bias is not None:
        pairs.append((module.out_proj.bias, full_bias[3]))
    return [(p, g) for p, g in pairs if p.requires_grad]


def attention_inner_edges(module: nn.Module, call: ModuleCall) -> list[GradientEdge]:
    """At recording time: the outputs of the call's four projections in its graph (see above),
    or none when the graph is not the expected one."""
    assert isinstance(module, nn.MultiheadAttention)
    if (
        module.bias_k is not None
        or module.bias_v is not None
        or type(module).forward is not nn.MultiheadAttention.forward  # biases added elsewhere?
        or saved_tensor_hooks_active()  # reading them could trigger the hooks' own work
    ):
        return []
    params = module._parameters  # without nn.Module's slow __getattr__ (this runs at every call)
    out_params = module.out_proj._parameters
    names = ("in_proj_weight",) if module._qkv_same_embed_dim else _SEPARATE_WEIGHTS
    in_weights = [params.get(name) for name in names]
    out_weight = out_params.get("weight")
    try:
        linears = find_graph_linears(call, [*in_weights, out_weight])  # type: ignore[list-item]
    except (AttributeError, RuntimeError, TypeError, IndexError):  # another torch's graph
        linears = None
    if linears is None:
        return []
    call.saved["projections_in_graph"] = linears
    # each projection's bias, found now: by the time the rule runs, FSDP2 has replaced the
    # module's parameters (those of the forward pass) by their shards
    in_bias, out_bias = params.get("in_proj_bias"), out_params.get("bias")
    biases: dict[int, tuple[Tensor | None, int]] = {}
    for linear in linears:
        if linear.weight is out_weight:
            biases[id(linear)] = (out_bias, 0)
        elif len(in_weights) == 1:  # packed: the rows of the weight are those of the bias
            biases[id(linear)] = (in_bias, linear.row)
        else:
            index = next(k for k, w in enumerate(in_weights) if w is linear.weight)
            biases[id(linear)] = (in_bias, index * module.embed_dim)
    call.saved["biases"] = biases
    # The projections' rows are (position, sample) pairs for batched inputs; unbatched ones are
    # a single sample.
    call.saved["batched"] = call.outputs[0].dim() == 3
    return [linear.edge for linear in linears]


_SEPARATE_WEIGHTS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def _recorded_projections(calls: Sequence[ModuleCall]) -> list[list[GraphLinear]] | None:
    """The projections found in the graph of every call (with the same blocks), or None."""
    linears = [call.saved.get("projections_in_graph") for call in calls]
    if any(found is None for found in linears):
        return None
    blocks = [[(id(f.weight), f.row, f.d_out) for f in found] for found in linears]  # type: ignore[union-attr]
    if any(b != blocks[0] for b in blocks) or any(
        call.batch_dim is not None and not call.saved["batched"] for call in calls
    ):
        return None
    return linears  # type: ignore[return-value]


def _recorded_bias_of(
    calls: Sequence[ModuleCall],
) -> Callable[[GraphLinear], tuple[Tensor | None, int]]:
    """The bias of each projection of the first call (whose projections the rules are given)."""
    biases = calls[0].saved["biases"]
    return lambda linear: biases[id(linear)]


def _arguments(module: nn.MultiheadAttention, call: ModuleCall) -> dict[str, Any]:
    bound = _signature(type(module)).bind(module, *call.args, **call.kwargs)
    bound.apply_defaults()
    return {name: _detach(value) for name, value in bound.arguments.items() if name != "self"}


@functools.cache
def _signature(module_type: type[nn.Module]) -> inspect.Signature:
    return inspect.signature(module_type.forward)


def _has_per_head_mask(module: nn.MultiheadAttention, call: ModuleCall) -> bool:
    mask = _arguments(module, call)["attn_mask"]
    return isinstance(mask, Tensor) and mask.dim() == 3


def _weights(module: nn.MultiheadAttention) -> list[Tensor]:
    if module._qkv_same_embed_dim:
        return [*module.in_proj_weight.chunk(3), module.out_proj.weight]
    return [
        module.q_proj_weight,
        module.k_proj_weight,
        module.v_proj_weight,
        module.out_proj.weight,
    ]


def _tied(module: nn.MultiheadAttention) -> bool:
    """Whether one tensor serves as two of the projections' weights (``k_proj_weight =
    q_proj_weight``, for instance): its per-sample gradient is then the sum of both uses, whose
    cross terms the per-projection Gramians miss (the rows are formed per sample instead)."""
    weights = _weights(module)
    return len({id(w) for w in weights}) < len(weights)


def _rerun(
    module: nn.MultiheadAttention, arguments: dict[str, Any]
) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    """``[Q, K, V]``, ``O`` (sequence-first) and the outputs ``[Y, weights]``, from the module's
    detached parameters (so that the backward pass stops at ``Q, K, V``)."""
    weights = [w.detach() for w in _weights(module)]
    b = module.in_proj_bias
    biases = [None] * 3 if b is None else list(b.detach().chunk(3))
    query, key, value = arguments["query"], arguments["key"], arguments["value"]
    batched = query.dim() == 3
    with torch.enable_grad():
        exposed = [
            F.linear(x, w, bias).requires_grad_()
            for x, w, bias in zip((query, key, value), weights[:3], biases, strict=True)
        ]
        q, k, v = exposed
        if module.batch_first and batched:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        if _is_plain(module, arguments, batched):
            heads, attention_weights = _plain_attention(q, k, v, module.num_heads), None
        else:
            heads, attention_weights = _masked_attention(module, arguments, q, k, v)
        out_bias = module.out_proj.bias
        Y = F.linear(heads, weights[3], None if out_bias is None else out_bias.detach())
        if module.batch_first and batched:
            Y = Y.transpose(0, 1)
    return exposed, heads, [Y, attention_weights]


def _is_plain(module: nn.MultiheadAttention, arguments: dict[str, Any], batched: bool) -> bool:
    """Whether the call is a plain attention: no mask, no attention weights, nothing appended."""
    masks = ("key_padding_mask", "attn_mask")
    return (
        batched
        and not module.add_zero_attn
        and not arguments["need_weights"]
        and not arguments["is_causal"]
        and all(arguments[name] is None for name in masks)
    )


def _plain_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """The concatenated heads ``[T, B, E]`` of sequence-first ``q, k, v``."""

    def split(t: Tensor) -> Tensor:  # [T, B, E] -> [B, H, T, E / H]
        return t.transpose(0, 1).unflatten(-1, (num_heads, -1)).transpose(1, 2)

    heads = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return heads.transpose(1, 2).flatten(2).transpose(0, 1)


def _masked_attention(
    module: nn.MultiheadAttention, arguments: dict[str, Any], q: Tensor, k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Torch's own attention (with every mask option) on projected ``q, k, v``: identity
    projections."""
    E = module.embed_dim
    identity = torch.eye(E, dtype=q.dtype, device=q.device)
    return F.multi_head_attention_forward(
        q, k, v, E, module.num_heads, None, None, None, None, module.add_zero_attn, 0.0,
        identity, None,
        training=False,
        key_padding_mask=arguments["key_padding_mask"],
        need_weights=arguments["need_weights"],
        attn_mask=arguments["attn_mask"],
        use_separate_proj_weight=True,
        q_proj_weight=identity, k_proj_weight=identity, v_proj_weight=identity,
        average_attn_weights=arguments["average_attn_weights"],
        is_causal=arguments["is_causal"],
    )  # fmt: skip


def _per_sample_gramian(
    module: nn.MultiheadAttention, calls: Sequence[ModuleCall], params: dict[str, Tensor]
) -> Tensor:
    J: Tensor | None = None
    for call in calls:
        rows = per_sample_jacobian(module, call, params, _in_dims(module, call))
        J = rows if J is None else J + rows
    assert J is not None
    return onednn.gram(J)


def _in_dims(module: nn.MultiheadAttention, call: ModuleCall) -> tuple[Any, Any]:
    names = list(inspect.signature(module.forward).parameters)

    def dim(name: str, value: object) -> int | None:
        if not isinstance(value, Tensor) or call.batch_dim is None:
            return None
        if name in ("query", "key", "value"):
            return call.batch_dim
        return 0 if name == "key_padding_mask" else None

    arg_dims = tuple(dim(names[k], a) for k, a in enumerate(call.args))
    kwarg_dims = {name: dim(name, v) for name, v in call.kwargs.items()}
    return arg_dims, kwarg_dims


def _detach(value: object) -> object:
    return value.detach() if isinstance(value, Tensor) else value


attention_rule.recomputes_forward = True  # type: ignore[attr-defined]
attention_rule.draws_random = dropout_draws_random(nn.MultiheadAttention.forward)  # type: ignore[attr-defined]
attention_rule.inner_edges = attention_inner_edges  # type: ignore[attr-defined]
attention_rule.weighted_gradients = attention_weighted_gradients  # type: ignore[attr-defined]
# the re-running path may leave calls to autograd (attention weights that reach the objectives)
attention_rule.fuses = lambda module, calls: _recorded_projections(calls) is not None  # type: ignore[attr-defined]
attention_rule.pure = attention_rule.fuses  # type: ignore[attr-defined]
