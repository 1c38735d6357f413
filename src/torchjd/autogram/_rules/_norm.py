r"""Normalisation layers: their per-objective gradients are small, so they are formed directly.

With :math:`\hat x` the normalised input (recomputed from the recorded input) and
:math:`\Gamma_{ir}` the output gradients of objective :math:`(i, r)`, the gradients w.r.t. the
affine parameters are

.. math::

    \nabla_{w} \ell_{ir} = \sum_{t} \gamma_{irt} \odot \hat x_{it}, \qquad
    \nabla_{b} \ell_{ir} = \sum_{t} \gamma_{irt},

summed over the positions :math:`t` that share a parameter (every position but the normalised
features for ``LayerNorm``/``RMSNorm``; the spatial positions of a channel for ``GroupNorm``,
``InstanceNorm`` and ``BatchNorm`` in eval mode, which normalises with its running statistics),
and :math:`G = J_w J_w^\top + J_b J_b^\top`. A ``BatchNorm`` that normalises with the batch's
statistics (only allowed with ``batch_dim=None``) goes through the generic rule.

For the fused step, the rule keeps these per-objective gradients (smaller than the output
gradients, which it releases), and the gradients of the weighted objectives are
:math:`\nabla_w = \sum_{ir} w_{ir} \nabla_w \ell_{ir}`, :math:`\nabla_b = \sum_{ir} w_{ir}
\nabla_b \ell_{ir}`.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from torchjd.autogram._module_call import (
    ModuleCall,
    cat,
    gram,
    samples_objectives_first,
    saved_tensor_hooks_active,
)
from torchjd.autogram._rules._generic import generic_rule

_SPATIAL_DIMS = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}


def layer_norm_rule(module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
    assert isinstance(module, nn.LayerNorm | nn.RMSNorm)
    lean = _lean_layer_norm_gramian(module, calls)
    if lean is not None:
        return lean
    shape = tuple(module.normalized_shape)
    J_w, J_b = [], []
    for call in calls:
        x = call.args[0]
        statistics = call.saved.pop("statistics", None)  # not kept beyond its use
        if statistics is not None and statistics[0] is not x:  # the input was replaced since
            statistics = None  # (torchjd.distributed gathers every rank's samples)
        x_hat = _layer_normalised(module, x, None if statistics is None else statistics[1:])
        gamma = call.grad_output()
        k = len(shape)
        if gamma.shape[0] == 1 and gamma.shape[1:] == x_hat.shape and gamma.dtype == x_hat.dtype:
            product = x_hat.mul_(gamma[0]).unsqueeze(0)  # in place: x_hat is a new tensor
        else:
            product = gamma * x_hat
        J_w.append(_sum_positions(product.flatten(-k), call.batch_dim, -1))
        J_b.append(_sum_positions(gamma.flatten(-k), call.batch_dim, -1))
    return _affine_gramian(module, calls, J_w, J_b)


def _lean_layer_norm_gramian(
    module: nn.LayerNorm | nn.RMSNorm, calls: Sequence[ModuleCall]
) -> Tensor | None:
    r"""The rule's Gramian in few operations for the common case, or None: one call of a
    ``LayerNorm`` over its last dimension, with samples along the first, one objective per
    sample, both affine parameters trained and the statistics of the forward pass at hand (see
    :func:`layer_norm_statistics`). Both parameters' per-sample gradients are written into one
    ``[B, 1, 2 C]`` tensor (the sums over the positions straight into its halves), kept as
    :func:`_affine_gramian` keeps them. The rule runs between large products that empty the
    caches, where each small operation costs several times what it costs alone (on one CPU
    thread, the four of ``benchmarks/autogram_step.py``'s Transformer: 0.03 ms shorter each, of
    0.15 to 0.2)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if (
        len(calls) != 1
        or len(module.normalized_shape) != 1
        or weight is None
        or bias is None
        or not (weight.requires_grad and bias.requires_grad)
    ):
        return None
    call = calls[0]
    x = call.args[0]
    statistics = call.saved.get("statistics")
    gamma = call.grad_outputs[0] if len(call.grad_outputs) == 1 else None
    if (
        statistics is None
        or statistics[0] is not x
        or call.batch_dim != 0
        or x.dim() < 2
        or gamma is None
        or gamma.shape[0] != 1
        or gamma.dtype != x.dtype
    ):
        return None
    del call.saved["statistics"]  # not kept beyond its use
    _, mean, rstd = statistics
    B, C = x.shape[0], x.shape[-1]
    product = torch.sub(x, mean).mul_(rstd).mul_(gamma[0]).reshape(B, -1, C)
    J = x.new_empty(B, 1, 2 * C)
    torch.sum(product, dim=1, out=J[:, 0, :C])
    torch.sum(gamma[0].reshape(B, -1, C), dim=1, out=J[:, 0, C:])
    call.saved["affine_jacobians"] = [(weight, J[:, :, :C]), (bias, J[:, :, C:])]
    call.grad_outputs = [None]
    return gram(J)


def layer_norm_statistics(module: nn.Module, call: ModuleCall) -> list[GradientEdge]:
    r"""At recording time: keeps in ``call.saved["statistics"]`` the call's input with the mean
    and the reciprocal standard deviation that its ``LayerNorm`` saved for the backward pass (by
    which it normalised that input), when its output comes straight from torch's layer norm and
    they can be read without unpacking hooks (activation checkpointing, offloading). The rule
    then forms :math:`\hat x = (x - \mu)\, \sigma^{-1}` from them (for that same input only),
    in a fraction of the time of a layer norm; in float32 and float64 only (in half precision on
    the CPU, the statistics are saved rounded to the input's dtype, and the product in that dtype
    loses what torch's layer norm keeps by accumulating in float32). Asks for no point inside the
    call (no edge)."""
    if (
        type(module) is not nn.LayerNorm
        or len(call.edges) != 1
        or type(call.edges[0].node).__name__ != "NativeLayerNormBackward0"
        or not call.args
        or not isinstance(call.args[0], Tensor)
        or call.args[0].dtype not in (torch.float32, torch.float64)
        or saved_tensor_hooks_active()
    ):
        return []
    node = call.edges[0].node
    try:
        mean, rstd = node._saved_result1, node._saved_result2
    except (AttributeError, RuntimeError):  # another torch's node
        return []
    x = call.args[0]
    k = len(module.normalized_shape)
    shape = (*x.shape[: x.dim() - k], *([1] * k))
    if all(
        isinstance(t, Tensor) and t.dtype == x.dtype and tuple(t.shape) == shape
        for t in (mean, rstd)
    ):
        call.saved["statistics"] = (x, mean, rstd)
    return []


def layer_norm_weighted_gradients(
    module: nn.Module, calls: Sequence[ModuleCall], W: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """The gradients of the weighted objectives w.r.t. the affine parameters of ``module``.

    :param W: The weights ``[B, R]`` of the objectives.
    """
    assert isinstance(module, nn.LayerNorm | nn.RMSNorm)
    return _weighted_jacobians(calls, W)


def _layer_normalised(
    module: nn.LayerNorm | nn.RMSNorm, x: Tensor, statistics: tuple[Tensor, Tensor] | None
) -> Tensor:
    """The normalised ``x`` (without the affine parameters), as a new tensor."""
    if statistics is not None:  # those of the forward pass (see layer_norm_statistics)
        mean, rstd = statistics
        return (x - mean).mul_(rstd)
    shape = tuple(module.normalized_shape)
    if isinstance(module, nn.LayerNorm):  # unit affine parameters: the faster kernel, same values
        ones = x.new_ones(shape)
        return F.layer_norm(x, shape, ones, torch.zeros_like(ones), eps=module.eps)
    eps = torch.finfo(x.dtype).eps if module.eps is None else module.eps
    return x * torch.rsqrt(x.pow(2).mean(tuple(range(-len(shape), 0)), True) + eps)


def channel_norm_rule(module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
    assert isinstance(module, nn.GroupNorm | _InstanceNorm | _BatchNorm)
    if isinstance(module, _BatchNorm) and any(_uses_batch_statistics(module, c) for c in calls):
        return generic_rule(module, calls)  # the whole batch is one sample (batch_dim=None)
    J_w, J_b = [], []
    for call in calls:
        x = call.args[0]
        channel_dim = _channel_dim(module, x, call.batch_dim)
        x_hat = _normalised(module, x, channel_dim, call.training)
        gamma = call.grad_output()
        J_w.append(_sum_positions(gamma * x_hat, call.batch_dim, channel_dim))
        J_b.append(_sum_positions(gamma, call.batch_dim, channel_dim))
    return _affine_gramian(module, calls, J_w, J_b)


def channel_norm_weighted_gradients(
    module: nn.Module, calls: Sequence[ModuleCall], W: Tensor
) -> list[tuple[Tensor, Tensor]] | None:
    """The gradients of the weighted objectives w.r.t. the affine parameters of ``module``, or
    None for a ``BatchNorm`` that normalises with the batch's statistics.

    :param W: The weights ``[B, R]`` of the objectives.
    """
    assert isinstance(module, nn.GroupNorm | _InstanceNorm | _BatchNorm)
    if isinstance(module, _BatchNorm) and any(_uses_batch_statistics(module, c) for c in calls):
        return None
    return _weighted_jacobians(calls, W)


layer_norm_rule.weighted_gradients = layer_norm_weighted_gradients  # type: ignore[attr-defined]
channel_norm_rule.weighted_gradients = channel_norm_weighted_gradients  # type: ignore[attr-defined]
layer_norm_rule.fuses = lambda module, calls: True  # type: ignore[attr-defined]
layer_norm_rule.pure = lambda module, calls: True  # type: ignore[attr-defined]
layer_norm_rule.inner_edges = layer_norm_statistics  # type: ignore[attr-defined]


def _per_sample_statistics(module: nn.Module, calls: Sequence[ModuleCall]) -> bool:
    """Whether the rule's own formula applies (else the generic rule, which re-runs the module)."""
    return not (
        isinstance(module, _BatchNorm) and any(_uses_batch_statistics(module, c) for c in calls)
    )


channel_norm_rule.fuses = _per_sample_statistics  # type: ignore[attr-defined]
channel_norm_rule.pure = _per_sample_statistics  # type: ignore[attr-defined]


def _uses_batch_statistics(module: _BatchNorm, call: ModuleCall) -> bool:
    return call.training or not module.track_running_stats


def _channel_dim(module: nn.Module, x: Tensor, batch_dim: int | None) -> int:
    if isinstance(module, nn.GroupNorm | _BatchNorm):
        return 1
    spatial = next(n for cls, n in _SPATIAL_DIMS.items() if isinstance(module, cls))
    return x.dim() - spatial - 1


def _normalised(module: nn.Module, x: Tensor, channel_dim: int, training: bool) -> Tensor:
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    batched = x if channel_dim == 1 else x.unsqueeze(0)
    if not isinstance(module, _BatchNorm) and (training or not module.track_running_stats):
        x_hat = F.instance_norm(batched, eps=module.eps)
    else:
        shape = [1, -1] + [1] * (batched.dim() - 2)
        mean = module.running_mean.reshape(shape)  # type: ignore[union-attr]
        var = module.running_var.reshape(shape)  # type: ignore[union-attr]
        x_hat = (batched - mean) / torch.sqrt(var + module.eps)
    return x_hat if channel_dim == 1 else x_hat.squeeze(0)


def _sum_positions(product: Tensor, batch_dim: int | None, param_dim: int) -> Tensor:
    """``[B, R, P]`` from ``[R, *shape]``, summing all but the batch and parameter dims.

    ``param_dim`` is the channel dimension of ``shape``, or -1 for the (flattened) trailing
    normalised dims.
    """
    if param_dim >= 0:
        product = product.movedim(param_dim + 1, -1)
        if batch_dim is not None and batch_dim > param_dim:
            batch_dim -= 1
    product = samples_objectives_first(product, batch_dim)
    return product.reshape(*product.shape[:2], -1, product.shape[-1]).sum(dim=2)


def _affine_gramian(
    module: nn.Module, calls: Sequence[ModuleCall], J_w: list[Tensor], J_b: list[Tensor]
) -> Tensor:
    """The Gramian of the per-objective gradients ``[B, R, P]`` of the trainable affine
    parameters (summed over the calls), which are kept for the fused step in place of the output
    gradients (smaller: no positions)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    kept: list[tuple[Tensor, Tensor]] = [
        (param, sum(J[1:], J[0]))
        for param, J in ((weight, J_w), (bias, J_b))
        if param is not None and param.requires_grad
    ]
    calls[0].saved["affine_jacobians"] = kept
    for call in calls:
        call.grad_outputs = [None] * len(call.grad_outputs)
    # one product for both parameters: [J_w J_b] [J_w J_b]^T = J_w J_w^T + J_b J_b^T
    return gram(cat([J.flatten(2) for _, J in kept], dim=2))


def _weighted_jacobians(calls: Sequence[ModuleCall], W: Tensor) -> list[tuple[Tensor, Tensor]]:
    r""":math:`\sum_{ir} w_{ir} J_{ir}` for the per-objective gradients ``J`` that the rule kept."""
    kept: list[tuple[Tensor, Tensor]] = calls[0].saved["affine_jacobians"]
    return [
        (param, torch.einsum("ir,irp->p", W.to(J.dtype), J).reshape(param.shape))
        for param, J in kept
    ]
