r"""``RNN``, ``LSTM`` and ``GRU``: every step of a cell applies two linear maps.

At step :math:`t`, a layer computes :math:`a_t = x_t W_{ih}^\top + b_{ih}` and
:math:`c_t = h_{t-1} W_{hh}^\top + b_{hh}`, then its gates from :math:`a_t, c_t` (and, for an
``LSTM`` with ``proj_size``, :math:`h_t = m_t W_{hr}^\top`). Each parameter is thus a linear layer
whose positions are the time steps, and the Gramian is the sum of the Linear blocks (see
``_linear.py``) with inputs :math:`x_t`, :math:`h_{t-1}` (:math:`m_t`) and the objectives'
gradients w.r.t. :math:`a_t`, :math:`c_t` (:math:`h_t`). The recurrence is re-run once, step by
step, on the recorded inputs with these maps exposed, and one backward pass gives the gradients.

With dropout between layers in training mode, or a ``PackedSequence`` input, the exact
masked-cotangent rule is used instead.

For the fused step, each map's gradient is that of a Linear layer for the weighted output
gradients :math:`\bar\Gamma_{it} = \sum_r w_{ir} \Gamma_{irt}`, from the inputs and gradients
that the rule kept.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchjd.autogram._batched_grad import batched_grad
from torchjd.autogram._module_call import (
    ModuleCall,
    cat,
    dropout_draws_random,
    gram,
    positions,
    samples_first,
    samples_objectives_first,
)
from torchjd.autogram._rules._generic import generic_rule, refuse_sharded
from torchjd.autogram._rules._linear import weight_gramian


class _Map:
    """One linear map of the recurrence: its inputs and its outputs at every step."""

    def __init__(self, weight: str, bias: str | None, per_step: bool) -> None:
        self.weight, self.bias, self.per_step = weight, bias, per_step
        self.inputs: list[Tensor] = []  # [B, T, d_in] per call
        self.outputs: list[Tensor] = []  # [B, T, d_out] per call (in the re-run graph)
        self.grads: list[Tensor] = []  # [B, R, T, d_out] per call


def rnn_rule(module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
    assert isinstance(module, nn.RNNBase)
    refuse_sharded(module, module.parameters())  # both paths re-run the module
    if any(_unsupported(module, call) for call in calls):
        return generic_rule(module, calls)
    maps: dict[str, _Map] = {}
    for call in calls:
        exposed, outputs = _rerun(module, call, maps)
        selected = [k for k, g in enumerate(call.grad_outputs) if g is not None]
        gammas = batched_grad(
            [outputs[call.output_leaf_indices[k]] for k in selected],
            exposed,
            [call.grad_outputs[k] for k in selected],  # type: ignore[misc]
        )
        dim = None if call.batch_dim is None else 0  # the re-run is batch-first
        R = call.num_objectives_per_sample
        grads = iter(gammas)
        for linear_map in maps.values():
            steps = [
                torch.zeros((R, *o.shape), dtype=o.dtype, device=o.device) if g is None else g
                for o, g in zip(linear_map.outputs, grads, strict=False)
            ]
            gamma = torch.stack(steps, dim=2) if linear_map.per_step else steps[0]  # [R,B,T,d]
            linear_map.grads.append(positions(samples_objectives_first(gamma, dim), 2))
            linear_map.inputs[-1] = positions(samples_first(linear_map.inputs[-1], dim), 1)
            linear_map.outputs = []
    G: Tensor | int = 0
    for linear_map in maps.values():
        X, Gamma = cat(linear_map.inputs, dim=1), cat(linear_map.grads, dim=2)
        saved = (linear_map.weight, linear_map.bias, X, Gamma)
        calls[0].saved.setdefault("maps", []).append(saved)  # for the fused step
        weight = getattr(module, linear_map.weight)
        if weight.requires_grad:
            G = G + weight_gramian(X.unsqueeze(0), Gamma.unsqueeze(0))
        bias = None if linear_map.bias is None else getattr(module, linear_map.bias)
        if bias is not None and bias.requires_grad:
            G = G + gram(Gamma.sum(dim=2))
    return G  # type: ignore[return-value]


def rnn_weighted_gradients(
    module: nn.Module, calls: Sequence[ModuleCall], W: Tensor
) -> list[tuple[Tensor, Tensor]] | None:
    """The gradients of the weighted objectives w.r.t. the trainable parameters of ``module``,
    or None where the Gramian came from the generic rule.

    :param W: The weights ``[B, R]`` of the objectives.
    """
    assert isinstance(module, nn.RNNBase)
    if any(_unsupported(module, call) for call in calls):
        return None
    grads = []
    for weight_name, bias_name, X, Gamma in calls[0].saved["maps"]:
        Gamma_bar = torch.einsum("brtd,br->btd", Gamma, W.to(Gamma.dtype)).flatten(0, 1)
        weight = getattr(module, weight_name)
        if weight.requires_grad:
            grads.append((weight, Gamma_bar.T @ X.flatten(0, 1).to(Gamma.dtype)))
        bias = None if bias_name is None else getattr(module, bias_name)
        if bias is not None and bias.requires_grad:
            grads.append((bias, Gamma_bar.sum(dim=0)))
    return grads


def _unsupported(module: nn.RNNBase, call: ModuleCall) -> bool:
    packed = isinstance(call.args[0], nn.utils.rnn.PackedSequence)
    return packed or (module.dropout > 0 and call.training and module.num_layers > 1)


def _rerun(
    module: nn.RNNBase, call: ModuleCall, maps: dict[str, _Map]
) -> tuple[list[Tensor], list[Tensor]]:
    """Re-runs the recurrence (batch-first) with detached parameters; registers each map's
    inputs and outputs in ``maps``. Returns the exposed outputs (map by map, step by step) and
    the module's output leaves."""
    x = call.args[0].detach()
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(1 if not module.batch_first else 0)
    if not module.batch_first:
        x = x.transpose(0, 1)
    B = x.shape[0]
    directions = 2 if module.bidirectional else 1
    is_lstm = isinstance(module, nn.LSTM)
    h0, c0 = _initial_states(module, hx, batched, B, x)
    exposed: list[Tensor] = []
    final_h, final_c = [], []
    with torch.enable_grad():
        layer_input = x
        for layer in range(module.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                h, c = h0[index], None if c0 is None else c0[index]
                steps, h, c = _run_direction(
                    module, suffix, layer_input, h, c, bool(direction), maps, exposed
                )
                outputs.append(steps)
                final_h.append(h)
                if c is not None:
                    final_c.append(c)
            layer_input = torch.cat(outputs, dim=2)
        output = layer_input if module.batch_first else layer_input.transpose(0, 1)
        h_n = torch.stack(final_h)
        if not batched:
            output = output.squeeze(0 if module.batch_first else 1)
            h_n = h_n.squeeze(1)
        leaves = [output, h_n]
        if is_lstm:
            c_n = torch.stack(final_c)
            leaves.append(c_n if batched else c_n.squeeze(1))
    return exposed, leaves


def _initial_states(
    module: nn.RNNBase, hx: object, batched: bool, B: int, x: Tensor
) -> tuple[Tensor, Tensor | None]:
    directions = 2 if module.bidirectional else 1
    is_lstm = isinstance(module, nn.LSTM)
    h_size = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    if hx is None:
        h0 = x.new_zeros(module.num_layers * directions, B, h_size)
        c0 = x.new_zeros(module.num_layers * directions, B, module.hidden_size) if is_lstm else None
        return h0, c0
    h0, c0 = hx if is_lstm else (hx, None)  # type: ignore[misc]
    h0 = h0.detach() if batched else h0.detach().unsqueeze(1)
    if c0 is not None:
        c0 = c0.detach() if batched else c0.detach().unsqueeze(1)
    return h0, c0


def _run_direction(
    module: nn.RNNBase,
    suffix: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    reverse: bool,
    maps: dict[str, _Map],
    exposed: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor | None]:
    def param(name: str) -> Tensor | None:
        value = getattr(module, name + suffix, None)
        return None if value is None else value.detach()

    def linear_map(weight: str, bias: str | None, per_step: bool) -> _Map:
        key = weight + suffix
        if key not in maps:
            bias = None if bias is None or not module.bias else bias + suffix
            maps[key] = _Map(key, bias, per_step)
        return maps[key]

    input_map = linear_map("weight_ih", "bias_ih", False)
    hidden_map = linear_map("weight_hh", "bias_hh", True)
    projected = getattr(module, "proj_size", 0)
    projection = linear_map("weight_hr", None, True) if projected else None
    W_ih, W_hh = param("weight_ih"), param("weight_hh")
    b_ih, b_hh = param("bias_ih"), param("bias_hh")
    a = F.linear(x, W_ih, b_ih)  # [B, T, gates]: the input map at every step
    a = a if a.requires_grad else a.requires_grad_()
    input_map.inputs.append(x)
    T = x.shape[1]
    hidden_in, hidden_out, proj_in, proj_out, steps = [], [], [], [], []
    for t in range(T - 1, -1, -1) if reverse else range(T):
        hidden_in.append(h)
        c_t = F.linear(h, W_hh, b_hh)
        c_t = c_t if c_t.requires_grad else c_t.requires_grad_()
        hidden_out.append(c_t)
        h, c, m = _cell(module, a[:, t], c_t, h, c)
        if projection is not None:
            proj_in.append(m)
            h = F.linear(m, param("weight_hr"))  # type: ignore[arg-type]
            proj_out.append(h)
        steps.append(h)

    def in_time_order(sequence: list[Tensor]) -> list[Tensor]:
        return sequence[::-1] if reverse else sequence

    input_map.outputs.append(a)
    exposed.append(a)
    hidden_map.inputs.append(torch.stack(in_time_order(hidden_in), dim=1).detach())
    hidden_map.outputs.extend(in_time_order(hidden_out))
    exposed.extend(in_time_order(hidden_out))
    if projection is not None:
        projection.inputs.append(torch.stack(in_time_order(proj_in), dim=1).detach())
        projection.outputs.extend(in_time_order(proj_out))
        exposed.extend(in_time_order(proj_out))
    output = torch.stack(in_time_order(steps), dim=1)
    return output, h, c


def _cell(
    module: nn.RNNBase, a: Tensor, c_t: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One step from the two maps' outputs: the new hidden state, cell state, and (for an LSTM)
    the input of the projection."""
    if isinstance(module, nn.LSTM):
        i, f, g, o = (a + c_t).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        m = torch.sigmoid(o) * torch.tanh(c)
        return m, c, m
    if isinstance(module, nn.GRU):
        a_r, a_z, a_n = a.chunk(3, dim=-1)
        c_r, c_z, c_n = c_t.chunk(3, dim=-1)
        r, z = torch.sigmoid(a_r + c_r), torch.sigmoid(a_z + c_z)
        n = torch.tanh(a_n + r * c_n)
        h = (1 - z) * n + z * h
        return h, None, h
    activation = torch.tanh if module.nonlinearity == "tanh" else torch.relu
    h = activation(a + c_t)
    return h, None, h


rnn_rule.recomputes_forward = True  # type: ignore[attr-defined]  (its fallback re-runs the module)
rnn_rule.draws_random = dropout_draws_random(nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward)  # type: ignore[attr-defined]
rnn_rule.weighted_gradients = rnn_weighted_gradients  # type: ignore[attr-defined]
rnn_rule.fuses = lambda module, calls: not any(_unsupported(module, c) for c in calls)  # type: ignore[attr-defined]
