r"""The Jacobian-backpropagation core shared by :func:`backward`, :func:`jac` and
:func:`mtl_backward`.

Given outputs :math:`y_1, \dots, y_r` and an initial Jacobian :math:`J_i` of shape
``[k, *y_i.shape]`` for each, it computes, for each input :math:`x`,

.. math::

    J_x = \sum_{i=1}^r J_i \, \frac{\partial y_i}{\partial x}
    \qquad (\text{shape } [k, *x.\text{shape}]),

that is ``k`` vector-Jacobian products sharing one graph. They run ``chunk_size`` rows at a time:
a chunk of several rows is one call of :func:`torch.autograd.grad` batched by :func:`torch.vmap`
(``is_grads_batched=True``); a chunk of one row is a plain call, with no vmap at all, so that layers
that vmap cannot batch (RNNs on some devices, compiled functions) still work.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchjd.autojac._checks import check_initial_jacobians

RowSource = Callable[[int, int], list[Tensor]]
"""``rows(start, stop)``: the rows ``start:stop`` of each initial Jacobian, ``[c, *y_i.shape]``."""


def identity_rows(outputs: Sequence[Tensor]) -> RowSource:
    """The rows of the identity: one row per element of the outputs, ``m = Σ_i y_i.numel()``.

    Only the requested rows are built (``c × m`` entries), never the whole ``m × m`` identity.
    """
    offsets = []
    offset = 0
    for output in outputs:
        offsets.append(offset)
        offset += output.numel()

    def rows(start: int, stop: int) -> list[Tensor]:
        blocks = []
        for output, offset in zip(outputs, offsets, strict=True):
            block = torch.zeros(
                (stop - start, output.numel()), dtype=output.dtype, device=output.device
            )
            block.diagonal(offset=start - offset).fill_(1.0)  # entries (r, start + r - offset)
            blocks.append(block.view(stop - start, *output.shape))
        return blocks

    return rows


def sliced_rows(jacobians: Sequence[Tensor]) -> RowSource:
    """The rows of given initial Jacobians."""
    return lambda start, stop: [J[start:stop] for J in jacobians]


def initial_rows(
    outputs: Sequence[Tensor], jacobians: object, name: str, outputs_name: str
) -> tuple[RowSource, int]:
    """The rows of the initial Jacobians given by the user (checked), or of the identity when
    ``jacobians`` is None, and their number ``k``."""
    if jacobians is None:
        return identity_rows(outputs), sum(output.numel() for output in outputs)
    initial = check_initial_jacobians(jacobians, outputs, name, outputs_name)
    return sliced_rows(initial), initial[0].shape[0]


def backpropagate(
    outputs: Sequence[Tensor],
    rows: RowSource,
    k: int,
    inputs: Sequence[Tensor],
    *,
    retain_graph: bool,
    chunk_size: int | None,
) -> list[Tensor]:
    """The Jacobians ``[k, *x.shape]`` of the ``k`` rows with respect to each input ``x``.

    Inputs on which no output depends get a Jacobian of zeros. A single chunk returns what autograd
    returns (no copy); several chunks write into one buffer per input, allocated once.
    """
    chunk = k if chunk_size is None else min(chunk_size, k)
    results: list[Tensor] | None = None
    for start in range(0, k, chunk):
        stop = min(start + chunk, k)
        last = stop == k
        grads = _vjp(outputs, rows(start, stop), inputs, retain_graph or not last)
        if start == 0 and last:
            return grads
        if results is None:
            results = [
                torch.empty((k, *g.shape[1:]), dtype=g.dtype, device=g.device) for g in grads
            ]
        for result, g in zip(results, grads, strict=True):
            result[start:stop].copy_(g)
        del grads
    assert results is not None
    return results


def _vjp(
    outputs: Sequence[Tensor], grad_outputs: list[Tensor], inputs: Sequence[Tensor], retain: bool
) -> list[Tensor]:
    """``c`` vector-Jacobian products at once: batched by vmap when ``c > 1``, plain otherwise."""
    c = grad_outputs[0].shape[0]
    batched = c > 1
    if not batched:
        grad_outputs = [g[0] for g in grad_outputs]
    try:
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs,
            retain_graph=retain,
            allow_unused=True,
            is_grads_batched=batched,
        )
    except RuntimeError as error:
        if not batched:
            raise
        raise RuntimeError(
            f"Backpropagating {c} rows at once with torch.vmap failed: {error}\nIf a layer of the "
            "model cannot be batched by vmap, pass `parallel_chunk_size=1` (no vmap at all)."
        ) from error
    result = []
    for g, x in zip(grads, inputs, strict=True):
        if g is None:
            g = torch.zeros((c, *x.shape), dtype=x.dtype, device=x.device)
        elif not batched:
            g = g.unsqueeze(0)
        result.append(g)
    return result
