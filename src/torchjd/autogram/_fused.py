r"""The fused step: the gradient of the weighted objectives from what the Gramian pass recorded.

Samples are independent, so the gradient of objective :math:`(i, r)` w.r.t. a hooked call's output
is the output gradient :math:`\Gamma_r` restricted to sample :math:`i`, and the gradient of the
weighted objectives :math:`\sum_{ir} w_{ir} \ell_{ir}` w.r.t. that output is
:math:`\bar\Gamma_i = \sum_r w_{ir} \Gamma_{ir}`. A rule with a ``weighted_gradients`` function
turns :math:`\bar\Gamma` and the recorded inputs into its parameters' gradients (for a Linear
layer :math:`\sum_i \bar\Gamma_i^\top X_i`), so only the other parameters need a second backward.
That function, ``weighted_gradients(module, calls, grad_outputs)``, receives :math:`\bar\Gamma` of
each call's main output and returns ``(parameter, gradient)`` pairs for the module's trainable
parameters, or None to leave them all to the second backward.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd.autogram._module_call import ModuleCall


def weighted_output_gradient(call: ModuleCall, W: Tensor) -> Tensor:
    r""":math:`\bar\Gamma`, shaped like the call's main output, from weights ``W`` ``[B, R]``."""
    gamma = call.grad_output(0).to(W.dtype)  # [R, *shape]
    batch_dim = call.output_batch_dims[0]
    if batch_dim is None:
        return torch.tensordot(W[0], gamma, dims=1)
    R, B = W.shape[1], W.shape[0]
    samples_last = gamma.movedim(batch_dim + 1, -1)  # [R, ..., B]
    weights = W.T.reshape(R, *[1] * (samples_last.dim() - 2), B)
    if R == 1:
        return (samples_last[0] * weights[0]).movedim(-1, batch_dim)
    return (samples_last * weights).sum(dim=0).movedim(-1, batch_dim)


def per_sample_weights(weights: Tensor, losses: Tensor, batch_dim: int | None) -> Tensor:
    """The weights (row-major over ``losses``) as ``[B, R]``: sample, objective of the sample."""
    if batch_dim is None:
        return weights.reshape(1, -1)
    shaped = weights.reshape(losses.shape).movedim(batch_dim, 0)
    return shaped.reshape(shaped.shape[0], -1)


def graph_leaves(root: Tensor) -> dict[int, tuple[Tensor, int]]:
    """The leaf tensors whose ``.grad`` a backward pass from ``root`` fills, by id, each with the
    number of graph edges that reach it (its uses)."""
    leaves: dict[int, tuple[Tensor, int]] = {}
    seen: set[Any] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for next_node, _ in node.next_functions:
            stack.append(next_node)
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
