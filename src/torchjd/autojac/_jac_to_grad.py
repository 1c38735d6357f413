r"""``jac_to_grad``: aggregates the Jacobian held in the ``.jac`` fields into ``.grad``."""

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator
from torchjd.aggregation._bases import _Composition, call_unchecked
from torchjd.autojac._accumulate import accumulate_grads
from torchjd.autojac._checks import as_tensors, check_distinct
from torchjd.linalg._gramian import gramian, symmetrized


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor | None:
    r"""Aggregates the Jacobians held in the ``.jac`` fields of ``tensors`` into their ``.grad``
    fields.

    The Jacobians (``[m, *t.shape]`` each) are the column blocks :math:`J_t` of one matrix
    :math:`J = [J_{t_1} \cdots J_{t_p}]` of shape ``[m, n]``. The aggregation :math:`\mathcal A(J)`
    (shape ``[n]``) is split back into blocks and summed into ``.grad``. For an aggregator of the
    form :math:`\mathcal A(J) = w^\top J`, the weights :math:`w` are returned (to log them).

    With a :class:`~torchjd.aggregation.GramianWeightedAggregator` (such as ``UPGrad()``) and
    ``optimize_gramian_computation=True``, the matrix :math:`J` is never built: the Gramian is
    summed block by block and the blocks are combined with the weights,

    .. math::

        G = \sum_t J_t J_t^\top, \qquad w = W(G), \qquad \texttt{t.grad} \mathrel{+}= w^\top J_t,

    which needs no memory beyond the ``.jac`` fields. Otherwise (and always when the aggregator has
    forward hooks, which must run), :math:`J` is assembled once and each ``.jac`` becomes a view of
    it, so that the old fields are freed as it is filled.

    :param tensors: The tensors (e.g. ``model.parameters()``) whose ``.jac`` to aggregate.
    :param aggregator: The aggregator of the rows of :math:`J`.
    :param retain_jac: Keep the ``.jac`` fields (they are deleted by default).
    :param optimize_gramian_computation: Compute the Gramian block by block, without building
        :math:`J` (only for a :class:`~torchjd.aggregation.GramianWeightedAggregator`).
    :returns: The weights ``[m]`` when the aggregator is a
        :class:`~torchjd.aggregation.WeightedAggregator`, else None.

    >>> import torch
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.autojac import backward, jac_to_grad
    >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> backward([param.pow(2).sum(), -param.sum()])  # conflicting objectives
    >>> param.jac
    tensor([[ 2.,  4.],
            [-1., -1.]])
    >>> jac_to_grad([param], UPGrad())  # the weights
    tensor([0.6500, 1.9984])
    >>> param.grad
    tensor([-0.6984,  0.6016])
    >>> torch.tensor([[2.0, 4.0], [-1.0, -1.0]]) @ param.grad  # conflicts with neither row
    tensor([1.0096, 0.0968])
    >>> hasattr(param, "jac")
    False

    The block-wise Gramian gives the same step:

    >>> param.grad = None
    >>> backward([param.pow(2).sum(), -param.sum()])
    >>> jac_to_grad([param], UPGrad(), optimize_gramian_computation=True)
    tensor([0.6500, 1.9984])
    >>> param.grad
    tensor([-0.6984,  0.6016])
    """
    params, jacobians = checked_inputs(tensors, aggregator, optimize_gramian_computation)
    if optimize_gramian_computation:
        assert isinstance(aggregator, GramianWeightedAggregator)  # checked above
        if _can_skip_matrix(aggregator):
            weights = _aggregate_by_blocks(params, jacobians, aggregator)
            if not retain_jac:
                _delete_jacs(params)
            return weights

    matrix = _assemble(params, jacobians)
    weights, aggregation = _aggregate(matrix, aggregator)
    gradients = [
        block.view(p.shape) for p, block in zip(params, _split(aggregation, params), strict=True)
    ]
    accumulate_grads(params, gradients)
    if not retain_jac:
        _delete_jacs(params)
    return weights


def checked_inputs(
    tensors: Iterable[Tensor], aggregator: Aggregator, optimize_gramian_computation: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """The tensors as a list and their ``.jac`` fields, once every argument is checked."""
    params = as_tensors(tensors, "tensors")
    check_distinct(params, "tensors")
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"`aggregator` must be a torchjd.aggregation.Aggregator, such as UPGrad(). Found "
            f"{type(aggregator).__name__}."
        )
    jacobians = _checked_jacobians(params)
    if optimize_gramian_computation and not isinstance(aggregator, GramianWeightedAggregator):
        raise ValueError(
            "`optimize_gramian_computation=True` needs a GramianWeightedAggregator (an "
            "aggregator that only depends on the Gramian J Jᵀ, such as UPGrad()). Found "
            f"{type(aggregator).__name__}; use optimize_gramian_computation=False."
        )
    return params, jacobians


def _checked_jacobians(params: list[Tensor]) -> list[Tensor]:
    jacobians = []
    for i, p in enumerate(params):
        J = getattr(p, "jac", None)
        if not isinstance(J, Tensor):
            raise ValueError(
                f"`tensors[{i}]` (shape {tuple(p.shape)}) has no `.jac` field. Fill it first with "
                "`torchjd.autojac.backward` or `mtl_backward` (and pass to `jac_to_grad` only "
                "the tensors that they filled)."
            )
        if J.ndim == 0 or J.shape[1:] != p.shape:
            raise ValueError(
                f"`tensors[{i}].jac` must have shape [m, *tensors[{i}].shape] = "
                f"[{', '.join(['m', *map(str, p.shape)])}]. Found {tuple(J.shape)}."
            )
        if J.shape[0] == 0:
            raise ValueError(
                f"`tensors[{i}].jac` must have at least one row (one per objective). Found shape "
                f"{tuple(J.shape)}."
            )
        if jacobians and J.shape[0] != jacobians[0].shape[0]:
            raise ValueError(
                "Every `.jac` must have the same number of rows (one per objective). Found "
                f"{jacobians[0].shape[0]} rows in `tensors[0].jac` and {J.shape[0]} in "
                f"`tensors[{i}].jac`."
            )
        if J.device != p.device:
            raise ValueError(
                f"`tensors[{i}].jac` must be on the device of `tensors[{i}]` ({p.device}). Found "
                f"{J.device}."
            )
        jacobians.append(J)
    devices = sorted({str(J.device) for J in jacobians})
    if len(devices) > 1:
        raise ValueError(f"Every `.jac` must be on the same device. Found {devices}.")
    return jacobians


def _assemble(params: list[Tensor], jacobians: list[Tensor]) -> Tensor:
    """The matrix ``[m, n]`` of the column blocks. Each ``.jac`` becomes a view of its block, and
    ``jacobians`` is emptied, so that the old storage of each block is freed as soon as it is
    copied (unless the user holds it): the peak is one matrix plus one block, not two matrices."""
    m = jacobians[0].shape[0]
    dtype = _common_dtype(jacobians)
    n = sum(p.numel() for p in params)
    matrix = torch.empty((m, n), dtype=dtype, device=jacobians[0].device)
    start = 0
    for i, p in enumerate(params):
        J = jacobians[i]
        jacobians[i] = matrix  # drops the last reference held here
        block = matrix[:, start : start + p.numel()]
        block.copy_(J.reshape(m, -1))
        if J.dtype == dtype:
            p.jac = block.view(J.shape)  # type: ignore[attr-defined]
        del J
        start += p.numel()
    return matrix


def _common_dtype(jacobians: list[Tensor]) -> torch.dtype:
    dtype = jacobians[0].dtype
    for J in jacobians[1:]:
        dtype = torch.promote_types(dtype, J.dtype)
    return dtype


def _split(vector: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    return torch.split(vector, [p.numel() for p in params])


def _aggregate(matrix: Tensor, aggregator: Aggregator) -> tuple[Tensor | None, Tensor]:
    """The aggregation of ``matrix``, through the aggregator's ``__call__`` (its hooks run), and
    the weights that its weighting returned, if it has one."""
    if not isinstance(aggregator, WeightedAggregator):
        return None, aggregator(matrix)
    captured: list[Tensor] = []

    def capture(_module: nn.Module, _input: object, output: Tensor) -> None:
        captured.append(output)

    handle = aggregator.weighting.register_forward_hook(capture)
    try:
        aggregation = aggregator(matrix)
    finally:
        handle.remove()
    return (captured[-1] if captured else None), aggregation


def _can_skip_matrix(aggregator: GramianWeightedAggregator) -> bool:
    """Whether ``W(G)ᵀ J`` may be computed without calling the aggregator on ``J``: neither it nor
    its composition with the Gramian has hooks, and its forward is the standard one."""
    composition = aggregator.weighting
    standard = (
        type(aggregator).forward is WeightedAggregator.forward
        and type(composition) is _Composition
        and composition.fn is gramian
    )
    hooks = [
        module._forward_hooks or module._forward_pre_hooks for module in (aggregator, composition)
    ]
    global_hooks = module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
    return standard and not any(hooks) and not global_hooks


def _aggregate_by_blocks(
    params: list[Tensor], jacobians: list[Tensor], aggregator: GramianWeightedAggregator
) -> Tensor:
    m = jacobians[0].shape[0]
    dtype = _common_dtype(jacobians)
    blocks = [J.reshape(m, -1).to(dtype) for J in jacobians]
    G = torch.zeros((m, m), dtype=dtype, device=blocks[0].device)
    for J_t in blocks:
        G.addmm_(J_t, J_t.T)
    weights = call_unchecked(aggregator.gramian_weighting, symmetrized(G))
    gradients = [(weights @ J_t).view(p.shape) for p, J_t in zip(params, blocks, strict=True)]
    accumulate_grads(params, gradients)
    return weights


def _delete_jacs(params: list[Tensor]) -> None:
    for p in params:
        del p.jac  # type: ignore[attr-defined]
