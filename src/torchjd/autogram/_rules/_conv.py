r"""Convolutions as linear layers on patches.

Unfolding the (padded) input into its patches :math:`X_i` (output positions :math:`\times`
:math:`C_{in}/g \cdot \prod_k k`) makes each group :math:`p` of a convolution a linear layer, with
the output gradients :math:`\Gamma_{ir}` of its :math:`C_{out}/g` channels at the output positions:

.. math::

    G_{ir,js} = \sum_p \langle X^p_i {X^p_j}^\top,\ \Gamma^p_{ir} {\Gamma^p_{js}}^\top \rangle_F
              + \Big(\sum_t \gamma_{irt}\Big) \cdot \Big(\sum_u \gamma_{jsu}\Big),

summed over the calls. When forming the per-objective gradients
:math:`J_{ir} = \sum_p {\Gamma^p_{ir}}^\top X^p_i` takes fewer flops than the closed form (many
positions: see ``_linear.py``), the rule forms them from the patches of a block of samples at a
time (at most ``PATCH_BYTES`` of patches), and :math:`G = J J^\top`; when :math:`J` would exceed
both ``CHUNK_BYTES`` and the output gradients and there is one objective per sample, it forms them
by blocks of output channels with the convolution's own kernel instead (the samples as the groups
of one convolution), so that no patches are formed. Otherwise (few positions), the closed form of
``_linear.py`` runs on the patches.

For the fused step, the gradient of the weighted objectives is :math:`\sum_{ir} w_{ir} J_{ir}`
when :math:`J` was formed whole and kept (in place of the output gradients, see ``KEEP_RATIO`` in
``_linear.py``), else the convolution's own weight gradient (``convolution_backward``) for the
weighted output gradient :math:`\bar\Gamma_i = \sum_r w_{ir} \Gamma_{ir}` and the recorded
(padded) input.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchjd.autogram._module_call import ModuleCall, cat, gram
from torchjd.autogram._rules._linear import (
    CHUNK_BYTES,
    keeps_jacobian,
    per_objective_is_cheaper,
    weight_gramian,
    weighted_jacobian,
)

PATCH_BYTES = 1 << 21
"""The most memory that the patches of one block of samples take on the per-objective path (small
blocks stay in cache, and reuse the allocator's memory from block to block)."""


def conv_rule(module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    n = len(module.kernel_size)
    g = module.groups
    gammas = [_output_grads(c, n, g) for c in calls]
    Gamma = cat(gammas, dim=3)  # [g, B, R, T, C_out/g]
    _, B, R, T, d_out = Gamma.shape
    d_in = module.weight[0].numel()
    sums = None
    if module.bias is not None and module.bias.requires_grad:
        sums = Gamma.sum(dim=3).permute(1, 2, 0, 3).reshape(B, R, -1)  # [B, R, C_out]
    G: Tensor | int = 0 if sums is None else gram(sums)
    if not module.weight.requires_grad:
        return G  # type: ignore[return-value]
    size = Gamma.element_size()
    if not per_objective_is_cheaper(B, R, T, d_in, d_out):  # the closed form
        X = cat([_patches(module, _samples_first(c.args[0], c.batch_dim, n)) for c in calls], 2)
        return G + weight_gramian(X, Gamma)
    jacobian_bytes = B * R * module.weight.numel() * size
    gamma_bytes = Gamma.numel() * size
    if _jacobian_fits(jacobian_bytes, gamma_bytes):
        positions = [c.shape[3] for c in gammas]
        J = _per_objective_jacobian(module, calls, Gamma, positions)  # [B R, weight.numel()]
        if keeps_jacobian(jacobian_bytes, gamma_bytes):  # for the fused step, in place of Γ
            calls[0].saved["jacobian"] = (J, sums)
            for call in calls:
                call.grad_outputs = [None] * len(call.grad_outputs)
        return G + J @ J.T
    if R == 1 and _batched(calls, n):
        return G + _per_sample_gramian(module, calls)
    X = cat([_patches(module, _samples_first(c.args[0], c.batch_dim, n)) for c in calls], 2)
    return G + weight_gramian(X, Gamma)


def conv_weighted_gradients(
    module: nn.Module, calls: Sequence[ModuleCall], W: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """The gradients of the weighted objectives w.r.t. the trainable parameters of ``module``.

    :param W: The weights ``[B, R]`` of the objectives.
    """
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    if "jacobian" in calls[0].saved:
        J, sums = calls[0].saved["jacobian"]
        weight_grad, bias_grad = weighted_jacobian(J, sums, W)  # [g, C_in/g prod(kernel), C_out/g]
        weight_grad = weight_grad.reshape(module.groups, module.weight[0].numel(), -1)
        pairs = [(module.weight, weight_grad.mT.contiguous().reshape(module.weight.shape))]
        return pairs if bias_grad is None else [*pairs, (module.bias, bias_grad)]
    n = len(module.kernel_size)
    weight_grad: Tensor | None = None
    bias_grad: Tensor | None = None
    for call in calls:
        gamma = call.weighted_grad_output(W)
        x = call.args[0]
        if x.dim() == n + 1:  # an unbatched input
            x, gamma = x.unsqueeze(0), gamma.unsqueeze(0)
        if module.weight.requires_grad:
            x, padding = _padded(module, x.to(gamma.dtype))
            _, g, _ = torch.ops.aten.convolution_backward(
                gamma, x, module.weight.to(gamma.dtype), None, module.stride, padding,
                module.dilation, False, [0] * n, module.groups, [False, True, False],
            )  # fmt: skip
            weight_grad = g if weight_grad is None else weight_grad + g
        if module.bias is not None and module.bias.requires_grad:
            b = gamma.transpose(0, 1).reshape(gamma.shape[1], -1).sum(dim=1)
            bias_grad = b if bias_grad is None else bias_grad + b
    grads = []
    if weight_grad is not None:
        grads.append((module.weight, weight_grad))
    if bias_grad is not None:
        grads.append((module.bias, bias_grad))
    return grads


conv_rule.weighted_gradients = conv_weighted_gradients  # type: ignore[attr-defined]
conv_rule.fuses = lambda module, calls: True  # type: ignore[attr-defined]
conv_rule.pure = lambda module, calls: True  # type: ignore[attr-defined]


def _jacobian_fits(jacobian_bytes: int, gamma_bytes: int) -> bool:
    """Whether the per-objective gradients are formed whole: when no larger than the output
    gradients or than ``CHUNK_BYTES``."""
    return jacobian_bytes <= max(CHUNK_BYTES, gamma_bytes)


def _per_objective_jacobian(
    module: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    calls: Sequence[ModuleCall],
    Gamma: Tensor,
    positions: list[int],
) -> Tensor:
    r"""The per-objective weight gradients :math:`J_{ir} = \sum_p {\Gamma^p_{ir}}^\top X^p_i`
    ``[B R, g C_in/g prod(kernel) C_out/g]`` (each group's block transposed: the faster
    product), summed over the calls, from the patches of a block of samples at a time (at most
    ``PATCH_BYTES`` each).

    :param Gamma: The output gradients of the calls ``[g, B, R, T, C_out/g]``, concatenated along
        the positions.
    :param positions: The number of positions of each call in ``Gamma``.
    """
    n, g = len(module.kernel_size), module.groups
    _, B, R, _, d_out = Gamma.shape
    d_in = module.weight[0].numel()
    J: Tensor | None = None
    start = 0  # where the positions of the call start in Gamma
    for call, T in zip(calls, positions, strict=True):
        x = _pad_images(module, _samples_first(call.args[0], call.batch_dim, n))
        J_call = Gamma.new_empty(B, R, g, d_in, d_out)
        step = max(1, PATCH_BYTES // (T * d_in * g * Gamma.element_size()))
        for first in range(0, B, step):
            X = _padded_patches(module, x[first : first + step]).to(Gamma.dtype)  # [g, b, T, d_in]
            gamma = Gamma[:, first : first + step, :, start : start + T]  # [g, b, R, T, d_out]
            if R == 1 and g == 1:  # straight into J (a contiguous block)
                torch.matmul(X[0].mT, gamma[0, :, 0], out=J_call[first : first + step, 0, 0])
            else:  # [g, b, R, d_in, d_out] -> [b, R, g, d_in, d_out]
                rows = X.unsqueeze(2).mT @ gamma
                J_call[first : first + step] = rows.permute(1, 2, 0, 3, 4)
        J = J_call if J is None else J + J_call
        start += T
    assert J is not None
    return J.reshape(B * R, -1)


def _batched(calls: Sequence[ModuleCall], n: int) -> bool:
    return all(c.args[0].dim() == n + 2 and c.batch_dim in (0, None) for c in calls)


def _per_sample_gramian(
    module: nn.Conv1d | nn.Conv2d | nn.Conv3d, calls: Sequence[ModuleCall]
) -> Tensor:
    r""":math:`J J^\top` of the per-sample weight gradients (one objective per sample), each
    the convolution's own weight gradient for that sample: the samples become groups of one
    convolution (``convolution_backward`` with ``B g`` groups), so that no patches are formed.
    Output channels go by blocks (at most ``CHUNK_BYTES`` of gradients each) when ``g = 1``."""
    n, g = len(module.kernel_size), module.groups
    C_out = module.out_channels
    shape = module.weight.shape[1:]
    x0, gamma0 = calls[0].args[0], calls[0].grad_output()[0]
    S = 1 if calls[0].batch_dim is None else x0.shape[0]
    row_bytes = S * module.weight[0].numel() * gamma0.element_size()
    step = max(1, CHUNK_BYTES // row_bytes) if g == 1 else C_out
    G = gamma0.new_zeros(S, S)
    for start in range(0, C_out, step):
        c = min(step, C_out - start)
        J: Tensor | int = 0
        for call in calls:
            gamma = call.grad_output()[0, :, start : start + c]
            x, padding = _padded(module, call.args[0].to(gamma.dtype))
            if S > 1:
                x, gamma = x.reshape(1, -1, *x.shape[2:]), gamma.reshape(1, -1, *gamma.shape[2:])
            _, per_sample, _ = torch.ops.aten.convolution_backward(
                gamma, x, gamma.new_zeros(S * c, *shape), None, module.stride, padding,
                module.dilation, False, [0] * n, S * g, [False, True, False],
            )  # fmt: skip
            J = J + per_sample.reshape(S, -1)
        G += J @ J.T  # type: ignore[union-attr]
    return G


def _samples_first(x: Tensor, batch_dim: int | None, n: int) -> Tensor:
    """``[B, N', C, *spatial]``: the samples, then the images of each sample."""
    if x.dim() == n + 1:  # an unbatched input
        x = x.unsqueeze(0)
    return x.unsqueeze(0) if batch_dim is None else x.unsqueeze(1)


def _patches(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> Tensor:
    """``[g, B, T, C_in/g * prod(kernel)]`` (a transposed view): the patches that each output
    position sees, from the images ``x`` ``[B, N', C, *spatial]``."""
    return _padded_patches(module, _pad_images(module, x))


def _pad_images(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> Tensor:
    """The images ``[B, N', C, *spatial]``, padded as the module pads them."""
    padded = F.pad(x.flatten(0, 1), _pad_amounts(module), mode=_pad_mode(module))
    return padded.reshape(*x.shape[:3], *padded.shape[2:])


def _padded_patches(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> Tensor:
    """:func:`_patches` of images that are already padded."""
    B, N, C = x.shape[:3]
    x = x.flatten(0, 1)
    n = len(module.kernel_size)
    for s, (k, stride, dilation) in enumerate(
        zip(module.kernel_size, module.stride, module.dilation, strict=True)
    ):
        x = x.unfold(2 + s, (k - 1) * dilation + 1, stride)[..., ::dilation]
    # [B N', C, *positions, *kernel] -> [B, g, C/g * kernel, N' * positions], one copy
    x = x.reshape(B, N, C, *x.shape[2:])
    order = [0, 2, *range(3 + n, 3 + 2 * n), 1, *range(3, 3 + n)]
    g = module.groups
    x = x.permute(order).reshape(B, g, C // g * _prod(module.kernel_size), -1)
    return x.permute(1, 0, 3, 2)


def _output_grads(call: ModuleCall, n: int, g: int) -> Tensor:
    """``[g, B, R, T, C_out/g]`` (a view when possible) from ``[R, (N,) C_out, *positions]``."""
    gamma = call.grad_output()
    if gamma.dim() == n + 2:  # an unbatched input
        gamma = gamma.unsqueeze(1)
    # [R, B, N', C_out, L]
    gamma = gamma.unsqueeze(1) if call.batch_dim is None else gamma.unsqueeze(2)
    R, B, N, C_out = gamma.shape[:4]
    gamma = gamma.reshape(R, B, N, g, C_out // g, -1)
    return gamma.permute(3, 1, 0, 2, 5, 4).reshape(g, B, R, -1, C_out // g)


def _padded(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` and the zero padding for ``convolution_backward``: other padding modes (and string
    paddings) applied to ``x`` beforehand."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return F.pad(x, _pad_amounts(module), mode=_pad_mode(module)), (0,) * len(
            module.kernel_size
        )
    return x, _padding_tuple(module)


def _pad_amounts(module: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> list[int]:
    """``F.pad`` amounts (last spatial dimension first), as the module pads its input."""
    amounts: list[int] = []
    for k, dilation, padding in zip(
        reversed(module.kernel_size),
        reversed(module.dilation),
        reversed(_padding_tuple(module)),
        strict=True,
    ):
        if module.padding == "same":
            total = dilation * (k - 1)
            amounts += [total // 2, total - total // 2]
        else:
            amounts += [padding, padding]
    return amounts


def _padding_tuple(module: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> tuple[int, ...]:
    if isinstance(module.padding, str):
        return (0,) * len(module.kernel_size)
    return tuple(module.padding)


def _pad_mode(module: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> str:
    return "constant" if module.padding_mode == "zeros" else module.padding_mode


def _prod(values: Sequence[int]) -> int:
    result = 1
    for v in values:
        result *= v
    return result
