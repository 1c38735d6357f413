r"""The fused step: the gradient of the weighted objectives from what the Gramian pass recorded.

Samples are independent, so the gradient of objective :math:`(i, r)` w.r.t. a hooked call's output
is the output gradient :math:`\Gamma_r` restricted to sample :math:`i`, and the gradient of the
weighted objectives :math:`\sum_{ir} w_{ir} \ell_{ir}` w.r.t. that output is
:math:`\bar\Gamma_i = \sum_r w_{ir} \Gamma_{ir}`. A rule with a ``weighted_gradients`` function
turns :math:`\bar\Gamma` and the recorded inputs into its parameters' gradients (for a Linear
layer :math:`\sum_i \bar\Gamma_i^\top X_i`), so only the other parameters need a second backward.
That function, ``weighted_gradients(module, calls, W)``, receives the weights ``W`` ``[B, R]``
(see ``ModuleCall.weighted_grad_output``) and returns ``(parameter, gradient)`` pairs for the
module's trainable parameters, or None to leave them all to the second backward.

A built-in rule also tells, from the recorded calls alone, whether its ``weighted_gradients``
will give every trainable parameter of the module (its ``fuses(module, calls)``). When that holds
for every leaf of the graph (no other leaf: no parameter outside the engine, no input that
requires grad, no parameter also used outside the hooked calls), no second backward pass will
run, and the pass that gives the output gradients frees the graph as it goes (see
:class:`FusionPlan`).
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchjd.autogram._module_call import ModuleCall, direct_parameters, flat_leaves


def _fuses(rule: Any, module: nn.Module, calls: Sequence[ModuleCall]) -> bool:
    """Whether ``rule`` (with ``weighted_gradients``) promises, through its ``fuses``, the whole
    gradients of ``module``'s parameters from ``calls``."""
    fuses = getattr(rule, "fuses", None)
    return fuses is not None and bool(fuses(module, calls))


class FusionPlan:
    """The leaves of the graph of the losses, and which of them the fused step can take from the
    rules: a parameter of a module whose rule has ``weighted_gradients``, used in the graph only
    by that module's calls.

    :param losses: The objectives.
    :param calls: The calls of each hooked module with trainable parameters.
    :param rules: Each module's rule, and whether it covers the module's children.
    :param leaves: :func:`graph_leaves` of ``losses``, if already known.
    """

    def __init__(
        self,
        losses: Tensor,
        calls: Mapping[nn.Module, Sequence[ModuleCall]],
        rules: Mapping[nn.Module, tuple[Any, bool]],
        leaves: dict[int, tuple[Tensor, int]] | None = None,
    ) -> None:
        self.leaves = graph_leaves(losses) if leaves is None else leaves
        self.inside: dict[nn.Module, dict[int, int]] = {}
        self._uncovered = dict(self.leaves)
        for module, module_calls in calls.items():
            rule, covers_children = rules[module]
            if getattr(rule, "weighted_gradients", None) is None:
                continue
            self.inside[module] = calls_uses(module_calls)
            if _fuses(rule, module, module_calls):
                self._cover(module, covers_children)
        self.complete = not self._uncovered
        """Whether the rules' ``fuses`` promise the gradient of every leaf: no second backward."""

    def add_group(
        self,
        calls: Mapping[nn.Module, Sequence[ModuleCall]],
        rules: Mapping[nn.Module, tuple[Any, bool]],
    ) -> None:
        """Lets the fused step take the gradients of the modules of a tie group (whose rules have
        ``weighted_gradients``) from their rules: a parameter's whole gradient is the sum of
        those of the group's modules that hold it when its uses in the graph are all inside
        their calls and every one of them fuses (a sparse ``Embedding`` does not: its share, and
        so the whole gradient, is left to the second backward pass)."""
        uses = {module: calls_uses(module_calls) for module, module_calls in calls.items()}
        fusing = {module: _fuses(rules[module][0], module, cs) for module, cs in calls.items()}
        held: dict[int, int] = {}  # the uses of each parameter inside the calls of its holders
        refused: set[int] = set()  # the parameters held by a module that does not fuse
        for module in calls:
            for param in direct_parameters(module, rules[module][1]):
                held[id(param)] = held.get(id(param), 0) + uses[module].get(id(param), 0)
                if not fusing[module]:
                    refused.add(id(param))
        for key in refused:
            held[key] = -1  # no count of uses: `accepts` refuses the parameter
        for module in calls:
            self.inside[module] = held
            if fusing[module]:
                self._cover(module, rules[module][1])
        self.complete = not self._uncovered

    def _cover(self, module: nn.Module, covers_children: bool) -> None:
        """The trainable parameters of ``module`` whose whole gradient its rule gives (see
        :meth:`accepts`) need no second backward pass."""
        for param in direct_parameters(module, covers_children):
            if param.requires_grad and self.accepts(module, param):
                self._uncovered.pop(id(param), None)

    def accepts(self, module: nn.Module, param: Tensor) -> bool:
        """Whether the fused gradient of ``param`` from the rule of ``module`` is its whole
        gradient: more uses in the whole graph than inside the calls are uses from outside the
        engine's modules (a parameter tied across the engine's boundary)."""
        uses = self.leaves.get(id(param))
        return uses is not None and uses[1] == self.inside.get(module, {}).get(id(param))


def per_sample_weights(weights: Tensor, losses: Tensor, batch_dim: int | None) -> Tensor:
    """The weights (row-major over ``losses``) as ``[B, R]``: sample, objective of the sample."""
    if batch_dim is None:
        return weights.reshape(1, losses.numel())
    if losses.dim() == 1:  # one objective per sample (without movedim's operation)
        return weights.reshape(losses.shape[0], 1)
    shaped = weights.reshape(losses.shape).movedim(batch_dim, 0)
    return shaped.reshape(shaped.shape[0], math.prod(shaped.shape[1:]))  # (no -1: empty batches)


def graph_leaves(root: Tensor) -> dict[int, tuple[Tensor, int]]:
    """The leaf tensors whose ``.grad`` a backward pass from ``root`` fills, by id, each with the
    number of graph edges that reach it (its uses)."""
    return _leaf_uses([root.grad_fn], set())


def calls_uses(calls: Sequence[ModuleCall]) -> dict[int, int]:
    """The uses of each leaf tensor (by id) inside the calls, summed over them: the graph edges
    that reach it from the nodes of a call (from its outputs down to its inputs)."""
    uses: dict[int, int] = {}
    for call in calls:
        for key, (_, count) in _leaf_uses([e.node for e in call.edges], input_nodes(call)).items():
            uses[key] = uses.get(key, 0) + count
    return uses


def call_graph(call: ModuleCall) -> Iterator[Any]:
    """The autograd nodes of the call, each once: from its outputs down to its inputs."""
    return (node for node, _ in call_walk(call))


def call_walk(call: ModuleCall) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    """The nodes of :func:`call_graph`, depth first, each with its ``next_functions`` (read once:
    each read builds a new tuple)."""
    seen = input_nodes(call)  # the walk stops there
    stack = [edge.node for edge in call.edges]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        edges = node.next_functions
        yield node, edges
        for child, _ in edges:  # those already seen are not pushed
            if child is not None and child not in seen:
                stack.append(child)


def input_nodes(call: ModuleCall) -> set[Any]:
    """The nodes of the call's inputs (where the graph of the call ends)."""
    inputs = [*flat_leaves(call.args), *flat_leaves(call.kwargs)]
    return {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}


def _leaf_uses(roots: list[Any], stops: set[Any]) -> dict[int, tuple[Tensor, int]]:
    """The leaf tensors reached from ``roots`` without going through ``stops``, by id, each with
    its uses (the edges that reach it), in one depth-first walk that does not enter the leaves'
    nodes."""
    accumulate_grad = torch._C._functions.AccumulateGrad
    leaves: dict[int, tuple[Tensor, int]] = {}
    seen: set[Any] = set(stops)
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for next_node, _ in node.next_functions:  # those already seen are not pushed
            if type(next_node) is accumulate_grad:  # a leaf's node
                leaf = next_node.variable
                leaves[id(leaf)] = (leaf, leaves.get(id(leaf), (leaf, 0))[1] + 1)
            elif next_node is not None and next_node not in seen:
                stack.append(next_node)
    return leaves


def accumulate(param: Tensor, grad: Tensor) -> None:
    """Adds ``grad`` to ``param.grad`` as autograd does."""
    if grad.dtype != param.dtype:
        grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)
