r"""``backward``: the Jacobian of all the objectives, stored in the ``.jac`` field of the leaves."""

from collections.abc import Iterable, Sequence

from torch import Tensor

from torchjd.autojac._accumulate import accumulate_jacs
from torchjd.autojac._checks import (
    as_tensors,
    check_chunk_size,
    check_differentiable,
    check_distinct,
    check_existing_jacs,
    check_leaves,
)
from torchjd.autojac._core import backpropagate, initial_rows
from torchjd.autojac._graph import leaves_of


def backward(
    tensors: Sequence[Tensor] | Tensor,
    /,
    *,
    jac_tensors: Sequence[Tensor] | Tensor | None = None,
    inputs: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    r"""Computes the Jacobian of every element of ``tensors`` with respect to the leaves, and
    sums it into their ``.jac`` fields.

    Each element of each tensor of ``tensors`` is one objective (``m`` in total, in order). For
    each leaf :math:`x` of ``inputs``, ``x.jac`` receives (or is increased by) the Jacobian

    .. math::

        \mathcal J_x = \sum_i J_i \, \frac{\partial y_i}{\partial x}
        \qquad (\text{shape } [k, *x.\text{shape}]),

    where :math:`y_i` are the tensors and :math:`J_i` their initial Jacobians (``jac_tensors``; the
    identity by default, so that :math:`k = m` and row :math:`j` is the gradient of objective
    :math:`j`). Follow it with :func:`jac_to_grad` to aggregate the rows into ``.grad``.

    :param tensors: The tensor or tensors to differentiate (the losses).
    :param jac_tensors: The initial Jacobians, one per tensor, of shape ``[k, *tensor.shape]``
        (the same ``k`` for all). The identity (``k = m``) when None.
    :param inputs: The leaf tensors whose ``.jac`` to fill. Every leaf that requires grad in the
        graph of ``tensors`` when None. None of them when empty (then nothing is done).
    :param retain_graph: Keep the graph, to differentiate through it again.
    :param parallel_chunk_size: How many rows to backpropagate at once with :func:`torch.vmap`:
        all of them when None; ``1`` uses no vmap at all (for layers that vmap cannot batch, such
        as RNNs on some devices). Smaller chunks use less memory and more time.

    The autojac tab of the instance-wise risk minimisation example: one objective per sample, whose
    Jacobian UPGrad aggregates into a step that increases none of the batch's losses.

    >>> import torch
    >>> from torch.nn import Linear, MSELoss, ReLU, Sequential
    >>> from torch.optim import SGD
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.autojac import backward, jac_to_grad
    >>> X, Y = torch.randn(8, 16, 10), torch.randn(8, 16)
    >>> model = Sequential(Linear(10, 5), ReLU(), Linear(5, 1))
    >>> loss_fn = MSELoss(reduction="none")
    >>> optimizer = SGD(model.parameters(), lr=0.1)
    >>> aggregator = UPGrad()
    >>> for x, y in zip(X, Y):
    ...     y_hat = model(x).squeeze(dim=1)  # shape: [16]
    ...     losses = loss_fn(y_hat, y)  # shape: [16]
    ...     backward(losses)
    ...     _ = jac_to_grad(model.parameters(), aggregator)  # returns the weights
    ...     optimizer.step()
    ...     optimizer.zero_grad()

    Each ``.jac`` has one row per objective:

    >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> y1 = param.pow(2).sum()
    >>> y2 = param.prod()
    >>> backward([y1, y2])
    >>> param.jac
    tensor([[2., 4.],
            [2., 1.]])
    """
    outputs = as_tensors(tensors, "tensors")
    check_differentiable(outputs, "tensors")
    chunk_size = check_chunk_size(parallel_chunk_size)
    rows, k = initial_rows(outputs, jac_tensors, "jac_tensors", "tensors")
    if inputs is None:
        leaves = leaves_of(outputs)
    else:
        leaves = as_tensors(inputs, "inputs", may_be_empty=True)  # none: nothing to fill
        check_leaves(leaves, "inputs")
        check_distinct(leaves, "inputs")
    check_existing_jacs(leaves, k, "inputs")
    if not leaves:
        return
    jacobians = backpropagate(
        outputs, rows, k, leaves, retain_graph=retain_graph, chunk_size=chunk_size
    )
    accumulate_jacs(leaves, jacobians)
