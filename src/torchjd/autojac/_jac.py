r"""``jac``: the Jacobians of the objectives with respect to given tensors, returned."""

from collections.abc import Iterable, Sequence

from torch import Tensor

from torchjd.autojac._checks import (
    as_tensors,
    check_chunk_size,
    check_differentiable,
)
from torchjd.autojac._core import backpropagate, initial_rows


def jac(
    outputs: Sequence[Tensor] | Tensor,
    inputs: Iterable[Tensor] | Tensor,
    *,
    jac_outputs: Sequence[Tensor] | Tensor | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> tuple[Tensor, ...]:
    r"""The Jacobians of every element of ``outputs`` with respect to each of ``inputs``, returned
    like :func:`torch.autograd.grad` returns gradients.

    With :math:`y_i` the outputs and :math:`J_i` their initial Jacobians (``jac_outputs``; the
    identity by default), the Jacobian with respect to the input :math:`x` is

    .. math::

        \mathcal J_x = \sum_i J_i \, \frac{\partial y_i}{\partial x}
        \qquad (\text{shape } [k, *x.\text{shape}]).

    :param outputs: The tensor or tensors to differentiate (``m`` objectives: all their elements).
    :param inputs: The tensor or tensors (leaves or not) to differentiate with respect to. Those on
        which no output depends get a Jacobian of zeros. None: an empty tuple.
    :param jac_outputs: The initial Jacobians, one per output, of shape ``[k, *output.shape]``
        (the same ``k`` for all). The identity (``k = m``) when None.
    :param retain_graph: Keep the graph, to differentiate through it again.
    :param parallel_chunk_size: How many rows to backpropagate at once with :func:`torch.vmap`:
        all of them when None; ``1`` uses no vmap at all.
    :returns: One Jacobian per input, of shape ``[k, *input.shape]``.

    >>> import torch
    >>> from torchjd.autojac import jac
    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> h = 3 * x  # an intermediate tensor
    >>> y = torch.stack([h.sum(), (h**2).sum()])
    >>> jac(y, [x, h])
    (tensor([[ 3.,  3.],
            [18., 36.]]), tensor([[ 1.,  1.],
            [ 6., 12.]]))
    """
    ys = as_tensors(outputs, "outputs")
    check_differentiable(ys, "outputs")
    xs = as_tensors(inputs, "inputs", may_be_empty=True)
    for i, x in enumerate(xs):
        if not x.requires_grad:
            raise ValueError(
                f"`inputs[{i}]` must require grad (a leaf with `requires_grad=True` or a tensor "
                "computed from one). Found a tensor with `requires_grad=False`."
            )
    chunk_size = check_chunk_size(parallel_chunk_size)
    rows, k = initial_rows(ys, jac_outputs, "jac_outputs", "outputs")
    if not xs:
        return ()
    return tuple(backpropagate(ys, rows, k, xs, retain_graph=retain_graph, chunk_size=chunk_size))
