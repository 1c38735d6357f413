r"""``average_grads``: the mean of the ranks' ``.grad`` fields, for the gradients computed outside
DDP's reduction (in ``no_sync()``) that are not part of a Jacobian."""

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from torchjd.autojac._checks import as_tensors, check_distinct
from torchjd.distributed._group import exchange_shapes, failed_ranks_error, resolve_group


def average_grads(
    tensors: Iterable[Tensor], /, *, process_group: dist.ProcessGroup | None = None
) -> None:
    r"""Replaces the ``.grad`` field of each tensor by its mean over the ranks of
    ``process_group``, :math:`\frac 1R \sum_{r=1}^R g_r`, in one all-reduce.

    Use it for the task-specific parameters after :func:`~torchjd.autojac.mtl_backward` inside
    ``no_sync()``: the global task losses are the means of the ranks' task losses, so their
    gradients are the means of the ranks' gradients (with equal local batch sizes). A tensor
    without ``.grad`` on every rank is skipped; one with ``.grad`` on some ranks only is an error.

    :param tensors: The tensors whose ``.grad`` to average: the same ones, in the same order, on
        every rank.
    :param process_group: The ranks to average over (the default group when None).

    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torchjd.distributed import average_grads
    >>> store = f"file://{tempfile.mkdtemp()}/store"
    >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> param.pow(2).sum().backward()
    >>> average_grads([param])
    >>> param.grad
    tensor([2., 4.])
    >>> dist.destroy_process_group()
    """
    group = resolve_group(process_group)
    try:
        params = as_tensors(tensors, "tensors")
        check_distinct(params, "tensors")
    except (TypeError, ValueError):
        exchange_shapes(None, group)
        raise
    with_grad = [p for p in params if p.grad is not None]
    mask = sum(1 << i for i, p in enumerate(params[:62]) if p.grad is not None)
    shapes = exchange_shapes((len(params), mask, len(with_grad)), group)
    if shapes is None:
        raise failed_ranks_error(group)
    if len(set(shapes)) > 1:
        raise ValueError(
            "Every rank must pass the same tensors, with `.grad` on the same ones. Found, by rank "
            f"(number of tensors, bit mask of those with .grad, number with .grad): {shapes}."
        )
    if not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])  # type: ignore[union-attr]
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    for p, g in zip(with_grad, flat.split([p.numel() for p in with_grad]), strict=True):
        p.grad = g.view(p.shape).to(p.grad.dtype)  # type: ignore[union-attr]
