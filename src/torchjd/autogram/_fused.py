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
"""

from collections.abc import Iterator
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_leaves

from torchjd.autogram._module_call import ModuleCall


def per_sample_weights(weights: Tensor, losses: Tensor, batch_dim: int | None) -> Tensor:
    """The weights (row-major over ``losses``) as ``[B, R]``: sample, objective of the sample."""
    if batch_dim is None:
        return weights.reshape(1, -1)
    shaped = weights.reshape(losses.shape).movedim(batch_dim, 0)
    return shaped.reshape(shaped.shape[0], -1)


def graph_leaves(root: Tensor) -> dict[int, tuple[Tensor, int]]:
    """The leaf tensors whose ``.grad`` a backward pass from ``root`` fills, by id, each with the
    number of graph edges that reach it (its uses)."""
    return _leaf_uses([root.grad_fn], set())


def call_uses(call: ModuleCall) -> dict[int, tuple[Tensor, int]]:
    """The uses of each leaf tensor inside the call: in the graph from the call's outputs down to
    its inputs."""
    return _leaf_uses([edge.node for edge in call.edges], _input_nodes(call))


def call_graph(call: ModuleCall) -> Iterator[Any]:
    """The autograd nodes of the call, each once: from its outputs down to its inputs."""
    return _nodes([edge.node for edge in call.edges], _input_nodes(call))


def _input_nodes(call: ModuleCall) -> set[Any]:
    inputs = tree_leaves((call.args, call.kwargs))
    return {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}


def _nodes(roots: list[Any], stops: set[Any]) -> Iterator[Any]:
    seen: set[Any] = set(stops)
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)


def _leaf_uses(roots: list[Any], stops: set[Any]) -> dict[int, tuple[Tensor, int]]:
    leaves: dict[int, tuple[Tensor, int]] = {}
    for node in _nodes(roots, stops):
        for next_node, _ in node.next_functions:
            leaf = getattr(next_node, "variable", None)  # an AccumulateGrad node
            if isinstance(leaf, Tensor):
                uses = leaves.get(id(leaf), (leaf, 0))[1]
                leaves[id(leaf)] = (leaf, uses + 1)
    return leaves


def accumulate(param: Tensor, grad: Tensor) -> None:
    """Adds ``grad`` to ``param.grad`` as autograd does."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)
