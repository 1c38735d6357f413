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
from torchjd.autojac._core import backpropagate, sliced_rows
from torchjd.autojac._graph import leaves_of, nested, unreached, walk


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

    whose row :math:`i` is the gradient of :math:`\ell_i`. Each head is backpropagated once, by a
    plain backward pass of its loss (giving its parameters' gradient and row :math:`i` of
    :math:`\partial \ell / \partial f`); only the ``m`` rows go through the shared trunk, batched.
    Follow it with :func:`jac_to_grad` on the shared parameters.

    :param tensors: The losses, one per task (scalars, unless ``grad_tensors`` is given).
    :param features: The tensor or tensors of shared features, from which the losses are computed.
    :param grad_tensors: One tensor per loss, of its shape: task ``i``'s objective is
        ``(grad_tensors[i] * tensors[i]).sum()``. Ones (scalar losses) when None.
    :param tasks_params: One iterable of parameters per task, which receive ``.grad``. When None,
        the leaves of each loss's graph above the features (excluding the shared parameters).
    :param shared_params: The parameters that receive ``.jac``. When None, the leaves of the
        graph of the features. When empty, none (only the task parameters receive ``.grad``).
    :param retain_graph: Keep the graph, to differentiate through it again. When False, the graph
        is freed as the passes go, the heads' included (a head that shares nodes with a later task's
        head or with the graph below the features keeps its graph while the losses live).
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
        shared = as_tensors(shared_params, "shared_params", may_be_empty=True)
        check_leaves(shared, "shared_params")
        check_distinct(shared, "shared_params")
    m = len(losses)
    # (a head's pass would run the nodes between nested features, which the trunk's pass needs)
    may_free = not retain_graph and not (len(feats) > 1 and nested(feats))
    # each head's walk down to the features: its nodes and its leaves (its parameters)
    heads = [walk([loss], feats) for loss in losses] if tasks_params is None or may_free else []
    per_task = _task_params(tasks_params, m, heads, shared)
    check_existing_jacs(shared, m, "shared_params")

    frees = [False] * m
    if may_free:
        trunk = shared if shared_params is None else leaves_of(feats)
        frees = _freeable_heads(heads, per_task, trunk)
    jac_features, task_params, task_grads = _backpropagate_heads(
        losses, scales, feats, per_task, frees
    )
    if not shared:  # only the heads are trained
        accumulate_grads(task_params, task_grads)
        return
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


def _freeable_heads(
    heads: list[tuple[set[int], dict[int, Tensor]]],
    per_task: list[list[Tensor]],
    trunk: list[Tensor],
) -> list[bool]:
    """For each task, whether its pass through its head may free the graph it runs through (as
    ``retain_graph=False`` asks), for features none of which depends on another: when no later
    task's head shares a node with it, and neither its walk down to the features (``heads``:
    :func:`walk`'s) nor its parameters reach the leaves ``trunk`` of the features' graph
    (every node below the features leads to one of them, so the pass then runs nothing that the
    trunk's pass needs)."""
    trunk_ids = {id(t) for t in trunk}
    later: set[int] = set()
    frees = []
    for (nodes, leaves), params in zip(reversed(heads), reversed(per_task), strict=True):
        reached = leaves.keys() | {id(p) for p in params}
        frees.append(nodes.isdisjoint(later) and reached.isdisjoint(trunk_ids))
        later |= nodes
    return frees[::-1]


def _backpropagate_heads(
    losses: list[Tensor],
    scales: list[Tensor],
    feats: list[Tensor],
    per_task: list[list[Tensor]],
    frees: list[bool],
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Row ``i`` of the Jacobian of the losses w.r.t. each feature, and the gradients of the task
    parameters (summed over the tasks that list them).

    One plain backward pass per task, through its own head only: a pass batched over the ``m``
    rows would go through every head ``m`` times, ``m − 1`` of them with zeros. Task ``i``'s pass
    frees its graph when ``frees[i]``.
    """
    rows: list[list[Tensor]] = [[] for _ in feats]
    grads: dict[int, tuple[Tensor, Tensor]] = {}
    for loss, scale, params, free in zip(losses, scales, per_task, frees, strict=True):
        inputs = [*feats, *params]
        outputs = torch.autograd.grad(loss, inputs, scale, retain_graph=not free, allow_unused=True)
        for row, f, g in zip(rows, feats, outputs, strict=False):
            row.append(torch.zeros_like(f) if g is None else g)
        for p, g in zip(params, outputs[len(feats) :], strict=True):
            if g is not None:
                grads[id(p)] = (p, g if id(p) not in grads else grads[id(p)][1] + g)
            elif id(p) not in grads:
                grads[id(p)] = (p, torch.zeros_like(p))
    jac_features = [torch.stack(row) for row in rows]
    return jac_features, [p for p, _ in grads.values()], [g for _, g in grads.values()]


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
    tasks_params: object,
    m: int,
    heads: list[tuple[set[int], dict[int, Tensor]]],
    shared: list[Tensor],
) -> list[list[Tensor]]:
    """The task-specific parameters of each of the ``m`` tasks (when None, the leaves of its
    head's walk, ``heads``, but the shared parameters)."""
    if tasks_params is None:
        shared_ids = {id(p) for p in shared}
        per_task = [[p for p in leaves.values() if id(p) not in shared_ids] for _, leaves in heads]
    else:
        if isinstance(tasks_params, Tensor) or not isinstance(tasks_params, Sequence):
            raise TypeError(
                "`tasks_params` must be a sequence with one iterable of parameters per task. "
                f"Found {type(tasks_params).__name__}."
            )
        if len(tasks_params) != m:
            raise ValueError(
                f"`tasks_params` must have one iterable of parameters per loss ({m}). "
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
    return per_task
