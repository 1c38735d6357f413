"""Vector-Jacobian products for a batch of cotangents."""

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class NotVectorized(RuntimeError):
    """The vectorised backward pass failed (an operation of the graph has no batching rule)."""


def batched_grad(
    outputs: Sequence[Any],
    inputs: Sequence[Any],
    cotangents: Sequence[Tensor],
    *,
    retain_graph: bool = True,
    vectorized_only: bool = False,
) -> tuple[Tensor | None, ...]:
    """Gradients of ``outputs`` w.r.t. ``inputs`` for each of the ``K`` cotangents.

    ``cotangents[k]`` has shape ``[K, *outputs[k].shape]``; each returned gradient has shape
    ``[K, *input.shape]`` (None for an input that ``outputs`` do not reach). Runs one vectorised
    backward pass (``is_grads_batched``), or one pass per cotangent when an operation of the graph
    has no batching rule.

    The graph is kept, except with ``retain_graph=False`` and one cotangent (``K = 1``): then the
    pass frees each node's saved tensors once it has run, as a plain backward pass does. With
    several, it is kept regardless (a vectorised pass that fails midway must leave the graph whole
    for the passes one by one). With ``vectorized_only``, a failed vectorised pass raises
    :class:`NotVectorized` instead of running the passes one by one.
    """
    num = cotangents[0].shape[0]
    if num == 1:
        grads = torch.autograd.grad(
            outputs,
            inputs,
            [c[0] for c in cotangents],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's "performance drop" notices
            return torch.autograd.grad(
                outputs,
                inputs,
                list(cotangents),
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
    except RuntimeError as error:
        # an operation without a batching rule (e.g. some RNN kernels): one pass each
        if vectorized_only:
            raise NotVectorized(str(error)) from error
    columns = [
        torch.autograd.grad(
            outputs, inputs, [c[k] for c in cotangents], retain_graph=True, allow_unused=True
        )
        for k in range(num)
    ]
    return tuple(
        None if column[0] is None else torch.stack(list(column))
        for column in zip(*columns, strict=True)
    )
