"""What the engine records about one call of a hooked module, and what a rule reads from it."""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from torchjd.autogram import _onednn as onednn


@dataclass
class ModuleCall:
    r"""One call of a hooked module during the forward pass, as a rule sees it.

    The objectives are indexed by pairs :math:`(i, r)`: a sample :math:`i < B` and an objective
    :math:`r < R` of that sample (``B = 1`` and ``R = m`` when the engine has no batch dimension).

    :param args: The positional arguments of the call (as received: not detached).
    :param kwargs: The keyword arguments of the call.
    :param outputs: The floating-point tensors of the call's output that require grad, in the order
        of ``torch.utils._pytree.tree_leaves(output)``, as :func:`shape_only` stand-ins: their
        shape, dtype and device, not their values.
    :param output_batch_dims: For each of ``outputs``, the dimension that indexes the samples, or
        None when the whole tensor belongs to one sample (engine without batch dimension).
    :param batch_dim: The batch dimension of the module's main input and output (None as above).
    :param grad_outputs: Filled by the engine before the rules run: for each of ``outputs``, the
        gradients :math:`\Gamma` of the objectives w.r.t. it, of shape ``[R, *output.shape]``
        (sample ``i``'s part of ``grad_outputs[k][r]`` is the gradient of objective ``(i, r)``), or
        None when that output did not reach the objectives.
    :param output_leaf_indices: The position of each of ``outputs`` among the leaves of the
        call's output (for rules that re-run the module).
    :param rng_state: The random state before the call, for rules that re-run the module (None
        when the rule does not).
    :param training: Whether the module was in training mode during the call.
    :param edges: Where each of ``outputs`` enters the autograd graph (engine internal).
    :param inner_edges: Points inside the call's graph where the rule wants the gradients of the
        objectives too (set at recording time by the rule's ``inner_edges`` function, if any).
    :param inner_grads: Filled by the engine with ``grad_outputs``: the gradients w.r.t.
        ``inner_edges``, each ``[R, *shape]`` (None for one that did not reach the objectives).
    :param saved: Free for the rule's own use, from the recording to the fused step (released with
        the output gradients).
    :param grad_hooks: The handles of the hooks on the outputs (engine internal).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Tensor]
    output_batch_dims: list[int | None]
    batch_dim: int | None
    output_leaf_indices: list[int] = field(default_factory=list)
    rng_state: Any = None
    training: bool = False
    grad_outputs: list[Tensor | None] = field(default_factory=list)
    edges: list[Any] = field(default_factory=list, repr=False)
    inner_edges: list[Any] = field(default_factory=list, repr=False)
    inner_grads: list[Tensor | None] = field(default_factory=list, repr=False)
    saved: dict[str, Any] = field(default_factory=dict, repr=False)
    grad_hooks: list[Any] = field(default_factory=list, repr=False)

    @property
    def num_samples(self) -> int:
        """:math:`B`: the number of samples (1 without batch dimension)."""
        if self.batch_dim is None:
            return 1
        reference = self.outputs[0]
        return reference.shape[self.output_batch_dims[0]]  # type: ignore[index]

    @property
    def num_objectives_per_sample(self) -> int:
        """:math:`R`: the number of objectives of each sample."""
        return next(g for g in self.grad_outputs if g is not None).shape[0]

    def grad_output(self, index: int = 0) -> Tensor:
        """``grad_outputs[index]`` with zeros in place of None."""
        gamma = self.grad_outputs[index]
        if gamma is None:
            shape = (self.num_objectives_per_sample, *self.outputs[index].shape)
            return self.outputs[index].new_zeros(shape)
        return gamma

    def weighted_grad_output(self, W: Tensor, index: int = 0) -> Tensor:
        r""":math:`\bar\Gamma_i = \sum_r w_{ir} \Gamma_{ir}`, the gradient of the weighted
        objectives w.r.t. ``outputs[index]`` (shaped like it), from the weights ``W`` ``[B, R]``."""
        return weighted(self.grad_output(index), self.output_batch_dims[index], W)


_HALF = (torch.float16, torch.bfloat16)


def in_float32(module: nn.Module, calls: list[ModuleCall]) -> list[ModuleCall]:
    """The calls of ``module`` as its rule sees them. When their output gradients are in half
    precision while the module's parameters are not (it ran under ``torch.autocast``), copies whose
    half-precision tensors (arguments, outputs' stand-ins, output and inner gradients) are in
    float32: a Gramian entry is a sum of products of gradients, which in float16 overflows beyond
    65504 (a gradient scaler's scale squared reaches that at once) and in bfloat16 rounds to 8 bits.
    (A module in half precision itself computes in it: a rule that re-runs it needs its arguments
    in its parameters' dtype.) The copies share ``saved``; :func:`release_like` passes the release
    of their output and inner gradients on."""
    if not any(g is not None and g.dtype in _HALF for c in calls for g in c.grad_outputs):
        return calls
    if any(p.dtype in _HALF for p in module.parameters()):
        return calls
    return [
        replace(
            c,
            args=tree_map(_in_float32, c.args),
            kwargs=tree_map(_in_float32, c.kwargs),
            outputs=[_stand_in_float32(o) for o in c.outputs],
            grad_outputs=[_in_float32(g) for g in c.grad_outputs],
            inner_grads=[_in_float32(g) for g in c.inner_grads],
        )
        for c in calls
    ]


def release_like(calls: list[ModuleCall], seen: list[ModuleCall]) -> None:
    """Releases the output and inner gradients of ``calls`` that the rule released in their copies
    ``seen`` (see :func:`in_float32`): it keeps what the fused step needs in their place."""
    if seen is calls:
        return
    for call, copy in zip(calls, seen, strict=True):
        call.grad_outputs = _released(call.grad_outputs, copy.grad_outputs)
        call.inner_grads = _released(call.inner_grads, copy.inner_grads)


def _released(mine: list[Tensor | None], seen: list[Tensor | None]) -> list[Tensor | None]:
    return [None if s is None else g for g, s in zip(mine, seen, strict=True)]


def _stand_in_float32(stand_in: Tensor) -> Tensor:
    """The stand-in (:func:`shape_only`) of an output in float32, if in half precision."""
    if stand_in.dtype not in _HALF:
        return stand_in
    return shape_only(stand_in.new_zeros((), dtype=torch.float32), stand_in.shape)


def _in_float32(value: Any) -> Any:
    if isinstance(value, Tensor) and value.dtype in _HALF:
        return value.float()
    return value


def weighted(gamma: Tensor, batch_dim: int | None, W: Tensor) -> Tensor:
    r""":math:`\sum_r w_{ir} \Gamma_{ir}` of gradients ``[R, *shape]`` whose samples are along
    ``batch_dim`` of ``shape`` (the whole tensor is one sample if None), as ``[*shape]``."""
    gamma = gamma.to(W.dtype)
    if batch_dim is None:
        return torch.tensordot(W[0], gamma, dims=1)
    B, R = W.shape
    shape = [R] + [1] * (gamma.dim() - 1)
    shape[batch_dim + 1] = B
    weights = W.T.reshape(shape)  # broadcast in place: the result keeps the layout of gamma[r]
    result = gamma[0] * weights[0]
    for r in range(1, R):  # no [R, *shape] temporary (4 objectives: ~4x faster than a sum)
        result.addcmul_(gamma[r], weights[r])
    return result


def samples_first(tensor: Tensor, batch_dim: int | None) -> Tensor:
    """``tensor`` with its sample dimension moved to the front (a new unit one if None)."""
    if batch_dim is None:
        return tensor.unsqueeze(0)
    return tensor.movedim(batch_dim, 0)


def samples_objectives_first(gamma: Tensor, batch_dim: int | None) -> Tensor:
    """Gradients ``[R, *shape]`` rearranged as ``[B, R, *shape without the batch dim]``."""
    if batch_dim is None:
        return gamma.unsqueeze(0)
    return gamma.movedim(batch_dim + 1, 0)


def positions(tensor: Tensor, num_leading: int) -> Tensor:
    """``[*leading, *positions, features]`` as ``[*leading, T, features]``."""
    return tensor.reshape(*tensor.shape[:num_leading], -1, tensor.shape[-1])


def cat(tensors: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` that does not copy a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def gram(per_objective: Tensor) -> Tensor:
    """:math:`J J^\\top` of per-objective gradients ``[B, R, *param]`` as ``[B R, B R]``."""
    J = per_objective.reshape(per_objective.shape[0] * per_objective.shape[1], -1)
    return onednn.gram(J)


def masked_cotangents(gamma: Tensor, batch_dim: int | None, num_samples: int) -> Tensor:
    """One cotangent per objective ``(i, r)``: ``gamma[r]`` restricted to sample ``i``.

    :param gamma: ``[R, *shape]``. Returns ``[B R, *shape]``.
    """
    if batch_dim is None:
        return gamma
    shape = [1] * gamma.dim()
    shape[batch_dim + 1] = num_samples
    eye = torch.eye(num_samples, dtype=gamma.dtype, device=gamma.device)
    masked = gamma.unsqueeze(0) * eye.reshape(num_samples, *shape)
    return masked.reshape(num_samples * gamma.shape[0], *gamma.shape[1:])


def flat_leaves(tree: Any) -> list[Any]:
    """``torch.utils._pytree.tree_leaves(tree)``, without its per-node dispatch for the common
    cases: a tensor; a plain tuple, list or dict of tensors and scalars (``None``, ``bool``,
    ``int``, ``float``, ``str``: the arguments of a ``MultiheadAttention`` and its outputs, for
    instance)."""
    if isinstance(tree, Tensor):
        return [tree]
    kind = type(tree)
    if kind is tuple or kind is list:
        items = tree
    elif kind is dict:
        items = tree.values()
    else:
        return tree_leaves(tree)
    if all(isinstance(t, Tensor) or type(t) in _ATOMS for t in items):
        return [t for t in items if t is not None or _NONE_IS_LEAF]
    return tree_leaves(tree)


_NONE_IS_LEAF = tree_leaves([None]) == [None]
"""Whether this torch's pytree takes ``None`` for a leaf (newer versions) or for an empty node."""

_ATOMS = frozenset({type(None), bool, int, float, str})
"""Types that ``tree_leaves`` takes for leaves (``None``: see ``_NONE_IS_LEAF``)."""


def dropout_draws_random(*stock_forwards: Any) -> Callable[[nn.Module], bool]:
    """A rule's ``draws_random(module)`` for modules whose only random numbers are their dropout's
    (``module.dropout``, in training mode), given the ``forward`` functions of the stock classes:
    a class that overrides them may draw its own, so its calls always record a random state."""

    def draws_random(module: nn.Module) -> bool:
        if type(module).forward not in stock_forwards:
            return True
        return module.training and module.dropout > 0

    return draws_random


def saved_tensor_hooks_active() -> bool:
    """Whether saved tensors are packed by hooks (activation checkpointing, offloading): a rule
    that reads the tensors saved in a call's graph while recording could trigger the hooks' own
    work, so it does not (it re-runs or recomputes instead)."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top_hooks is None or top_hooks(False) is not None


def direct_parameters(module: nn.Module, recurse: bool) -> list[Tensor]:
    """``list(module.parameters(recurse))``, without the generators for ``recurse=False``."""
    if recurse:
        return list(module.parameters())
    params = [p for p in module._parameters.values() if p is not None]
    if len({id(p) for p in params}) < len(params):  # one parameter under two names
        return list(module.parameters(recurse=False))
    return params


def shape_only(tensor: Tensor, shape: tuple[int, ...] | torch.Size | None = None) -> Tensor:
    """A stand-in for ``tensor`` with its dtype and device and its shape (or ``shape``), but one
    stored element (zero, expanded).

    The engine keeps a call's outputs for their metadata only: holding the output itself would keep
    its memory alive until the Gramian is computed, whereas autograd frees an output that no
    backward formula saves (the output of a layer followed by a ReLU, for instance) as soon as the
    next operation has run."""
    return tensor.new_zeros(()).expand(tensor.shape if shape is None else shape)
