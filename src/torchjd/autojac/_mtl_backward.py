r"""``mtl_backward``: multi-task backward pass. Task-specific parameters get ordinary gradients,
shared parameters get the Jacobian of the task losses, through the shared features."""

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from torchjd.autojac._accumulate import accumulate_grads, accumulate_jacs
from torchjd.autojac._checks import (
    as_tensors,
    check_chunk_size,
    check_differentiable,
    check_distinct,
    check_existing_jacs,
    check_leaves,
)
from torchjd.autojac._core import RowSource, backpropagate, sliced_rows
from torchjd.autojac._graph import leaves_of, unreached


def mtl_backward(
    tensors: Sequence[Tensor] | Tensor,
    /,
    features: Sequence[Tensor] | Tensor,
    *,
    grad_tensors: Sequence[Tensor] | None = None,
    tasks_params: Sequence[Iterable[Tensor]] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    r"""The backward pass of multi-task learning: each task's loss gives ordinary gradients to its
    own parameters, and the Jacobian of the task losses goes to the shared parameters.

    With task losses :math:`\ell_1, \dots, \ell_m` computed from shared features :math:`f`, task
    :math:`i`'s parameters :math:`\theta_i` receive :math:`\partial \ell_i / \partial \theta_i`
    in ``.grad``, and each shared parameter :math:`\theta` receives in ``.jac`` the Jacobian

    .. math::

        \mathcal J_\theta = \frac{\partial \ell}{\partial f} \, \frac{\partial f}{\partial \theta}
        \qquad (\text{shape } [m, *\theta.\text{shape}]),

    whose row :math:`i` is the gradient of :math:`\ell_i`. The heads are backpropagated once for
    :math:`\partial \ell / \partial f` (``m`` rows); only these rows go through the shared trunk.
    Follow it with :func:`jac_to_grad` on the shared parameters.

    :param tensors: The losses, one per task (scalars, unless ``grad_tensors`` is given).
    :param features: The tensor or tensors of shared features, from which the losses are computed.
    :param grad_tensors: One tensor per loss, of its shape: task ``i``'s objective is
        ``(grad_tensors[i] * tensors[i]).sum()``. Ones (scalar losses) when None.
    :param tasks_params: One iterable of parameters per task, which receive ``.grad``. When None,
        the leaves of each loss's graph above the features (excluding the shared parameters).
    :param shared_params: The parameters that receive ``.jac``. When None, the leaves of the
        graph of the features.
    :param retain_graph: Keep the graph, to differentiate through it again.
    :param parallel_chunk_size: How many rows to backpropagate at once with :func:`torch.vmap`:
        all of them when None; ``1`` uses no vmap at all.

    >>> import torch
    >>> from torch.nn import Linear, MSELoss, ReLU, Sequential
    >>> from torch.optim import SGD
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.autojac import jac_to_grad, mtl_backward
    >>> shared = Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU())
    >>> task1, task2 = Linear(3, 1), Linear(3, 1)
    >>> params = [*shared.parameters(), *task1.parameters(), *task2.parameters()]
    >>> optimizer = SGD(params, lr=0.1)
    >>> loss_fn = MSELoss()
    >>> x, y1, y2 = torch.randn(16, 10), torch.randn(16, 1), torch.randn(16, 1)
    >>> features = shared(x)
    >>> loss1 = loss_fn(task1(features), y1)
    >>> loss2 = loss_fn(task2(features), y2)
    >>> mtl_backward([loss1, loss2], features=features)
    >>> shared[0].weight.jac.shape  # one row per task
    torch.Size([2, 5, 10])
    >>> task1.weight.grad.shape
    torch.Size([1, 3])
    >>> weights = jac_to_grad(shared.parameters(), UPGrad())
    >>> optimizer.step()
    """
    losses = as_tensors(tensors, "tensors")
    check_differentiable(losses, "tensors")
    scales = _check_grad_tensors(grad_tensors, losses)
    feats = as_tensors(features, "features")
    check_differentiable(feats, "features")
    chunk_size = check_chunk_size(parallel_chunk_size)
    missing = unreached(losses, feats)
    if missing:
        raise ValueError(
            f"`features` must be tensors from which the losses are computed. The losses do not "
            f"depend on `features[{missing[0]}]`"
            + (f" (nor on features {missing[1:]})" if len(missing) > 1 else "")
            + ": pass the output of the shared part of the model, the one used by the task heads."
        )
    if shared_params is None:
        shared = leaves_of(feats)
    else:
        shared = as_tensors(shared_params, "shared_params")
        check_leaves(shared, "shared_params")
        check_distinct(shared, "shared_params")
    task_params = _task_params(tasks_params, losses, feats, shared)
    m = len(losses)
    check_existing_jacs(shared, m, "shared_params")

    rows = _task_rows(losses, scales)
    jac_features = backpropagate(losses, rows, m, feats, retain_graph=True, chunk_size=chunk_size)
    task_grads: list[Tensor] = []
    if task_params:
        grads = torch.autograd.grad(
            losses, task_params, scales, retain_graph=True, allow_unused=True
        )
        task_grads = [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, task_params, strict=True)
        ]
    jac_shared = backpropagate(
        feats,
        sliced_rows(jac_features),
        m,
        shared,
        retain_graph=retain_graph,
        chunk_size=chunk_size,
    )
    accumulate_grads(task_params, task_grads)
    accumulate_jacs(shared, jac_shared)


def _check_grad_tensors(grad_tensors: object, losses: list[Tensor]) -> list[Tensor]:
    if grad_tensors is None:
        for i, loss in enumerate(losses):
            if loss.numel() != 1:
                raise ValueError(
                    f"`tensors[{i}]` must be a scalar (one loss per task) when `grad_tensors` is "
                    f"None. Found shape {tuple(loss.shape)}: reduce it, or give `grad_tensors`."
                )
        return [torch.ones_like(loss) for loss in losses]
    scales = as_tensors(grad_tensors, "grad_tensors")
    if len(scales) != len(losses):
        raise ValueError(
            f"`grad_tensors` must have one tensor per loss ({len(losses)}). Found {len(scales)}."
        )
    for i, (scale, loss) in enumerate(zip(scales, losses, strict=True)):
        if scale.shape != loss.shape or scale.dtype != loss.dtype or scale.device != loss.device:
            raise ValueError(
                f"`grad_tensors[{i}]` must have the shape, dtype and device of `tensors[{i}]` "
                f"({tuple(loss.shape)}, {loss.dtype}, {loss.device}). Found "
                f"({tuple(scale.shape)}, {scale.dtype}, {scale.device})."
            )
    return scales


def _task_params(
    tasks_params: object, losses: list[Tensor], feats: list[Tensor], shared: list[Tensor]
) -> list[Tensor]:
    """The task-specific parameters of all tasks, each once."""
    if tasks_params is None:
        shared_ids = {id(p) for p in shared}
        per_task = [
            [p for p in leaves_of([loss], stop_at=feats) if id(p) not in shared_ids]
            for loss in losses
        ]
    else:
        if isinstance(tasks_params, Tensor) or not isinstance(tasks_params, Sequence):
            raise TypeError(
                "`tasks_params` must be a sequence with one iterable of parameters per task. "
                f"Found {type(tasks_params).__name__}."
            )
        if len(tasks_params) != len(losses):
            raise ValueError(
                f"`tasks_params` must have one iterable of parameters per loss ({len(losses)}). "
                f"Found {len(tasks_params)}."
            )
        per_task = []
        for i, params in enumerate(tasks_params):
            params = [] if params is None else list(params)
            for j, p in enumerate(params):
                if not isinstance(p, Tensor):
                    raise TypeError(
                        f"`tasks_params[{i}]` must contain only tensors. Found "
                        f"`tasks_params[{i}][{j}]` of type {type(p).__name__}."
                    )
            check_leaves(params, f"tasks_params[{i}]")
            per_task.append(params)
    unique: dict[int, Tensor] = {}
    for params in per_task:
        for p in params:
            unique.setdefault(id(p), p)
    return list(unique.values())


def _task_rows(losses: list[Tensor], scales: list[Tensor]) -> RowSource:
    """Row ``i`` holds ``scales[i]`` in the slot of loss ``i`` and zeros elsewhere."""

    def rows(start: int, stop: int) -> list[Tensor]:
        blocks = []
        for i, (loss, scale) in enumerate(zip(losses, scales, strict=True)):
            block = torch.zeros((stop - start, *loss.shape), dtype=loss.dtype, device=loss.device)
            if start <= i < stop:
                block[i - start] = scale
            blocks.append(block)
        return blocks

    return rows
