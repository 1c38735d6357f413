r"""Convolutions as linear layers on patches.

Unfolding the (padded) input into its patches :math:`X_i` (output positions :math:`\times`
:math:`C_{in}/g \cdot \prod_k k`) makes each group :math:`p` of a convolution a linear layer, with
the output gradients :math:`\Gamma_{ir}` of its :math:`C_{out}/g` channels at the output positions:

.. math::

    G_{ir,js} = \sum_p \langle X^p_i {X^p_j}^\top,\ \Gamma^p_{ir} {\Gamma^p_{js}}^\top \rangle_F
              + \Big(\sum_t \gamma_{irt}\Big) \cdot \Big(\sum_u \gamma_{jsu}\Big),

summed over the calls. When forming the per-objective gradients
:math:`J_{ir} = \sum_p {\Gamma^p_{ir}} X^p_i` takes fewer flops than the closed form (many
positions: see ``_linear.py``), the rule forms them and :math:`G = J J^\top`: one batched product
(the samples and groups as the batch) per objective of a sample, on a block of samples at a time
(at most ``PATCH_BYTES`` of patches each). When the patches are wide enough
(:math:`C_{in}/g \cdot \prod_{k > 1} k` at least ``LOOP_MIN_WIDTH``) and each sample has one
image, the offsets :math:`a` of the first kernel dimension are not unfolded: with
:math:`X^{(a)}_i` the patches of the other kernel dimensions at the rows :math:`a d_1 + t s_1`
(a slice of one copy of the input, split by the stride's phases),

.. math::

    J^{(a)}_{ir} = \sum_p \Gamma^p_{ir} X^{p,(a)}_i,
    \qquad G = \sum_a J^{(a)} {J^{(a)}}^\top,

so that the patches copy the input :math:`\prod_{k > 1} k` times instead of :math:`\prod_k k`
times. Unfolded whole, the patches get one more column, of ones, whose entries of
:math:`J_{ir}` are the bias's per-objective gradients :math:`\sum_t \gamma_{irt}` (no pass of
their own over the output gradients; :math:`J J^\top` then holds the bias's block). When
:math:`J` would exceed both ``CHUNK_BYTES`` and the output gradients (their sum, when it is kept
for the fused step: see below), it is formed by blocks of output channels of about
``CHUNK_BYTES`` each (their Gramians summed). Otherwise (few positions), the closed form of
``_linear.py`` runs on the patches.

On the CPU with oneDNN, in float32, for patches at least ``GROUPED_MIN_WIDTH`` wide, :math:`J`
formed whole comes instead from convolution kernels, without patches: placing the samples side by
side along the channels (``[1, B C_in, *spatial]``), a convolution with one group per sample and
group of the module has, as its weight gradient for the output gradients of objective :math:`r`,
the per-sample weight gradients :math:`J_{ir}` (``[B C_out, C_in/g, *kernel]``), and as its bias
gradient the bias's per-objective gradients; there, oneDNN's kernel for it runs about twice as
fast as the batched products (on blocks of samples, into fresh memory, in the Gramian's step,
whose peak memory it would set otherwise: see ``GROUPED_WHOLE_BYTES``). :math:`G = J J^\top` is
formed by its lower triangle when large enough (about half of the products: see
:func:`_blocks_gram`); in float32 on the CPU with oneDNN, by oneDNN's matrix products (on one
thread of an AMD EPYC, about twice as fast as those of the BLAS, which do not use its widest vector
instructions there).

For the fused step, the gradient of the weighted objectives is :math:`\sum_{ir} w_{ir} J_{ir}`
(the bias's too, when in :math:`J`) when :math:`J` was formed whole and kept (in place of the
output gradients, see ``KEEP_RATIO`` in ``_linear.py``), else the convolution's own weight
gradient (``convolution_backward``) for the weighted output gradient
:math:`\bar\Gamma_i = \sum_r w_{ir} \Gamma_{ir}` and the recorded (padded) input.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchjd.autogram._module_call import ModuleCall, cat, gram
from torchjd.autogram._onednn import (
    lower_triangle_gram,
    onednn_blocks_gram,
    onednn_gram_is_faster,
)
from torchjd.autogram._rules._linear import (
    CHUNK_BYTES,
    by_sample,
    keeps_jacobian,
    per_objective_is_cheaper,
    weight_gramian,
)
from torchjd.autogram._workspace import empty, fusing

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d

PATCH_BYTES = 1 << 21
"""The most memory that the patches of one block of samples take on the per-objective path (small
blocks stay in cache, and reuse the allocator's memory from block to block)."""

GROUPED_MIN_WIDTH = 64
r"""The narrowest patches (:math:`C_{in}/g \cdot \prod_k k` columns) for which the per-objective
gradients come from one grouped convolution's weight gradient (see :func:`_grouped_jacobian`)
rather than from products on the patches, on the CPU with oneDNN: there its convolution kernels
run faster than the products; narrower (a first layer on 3 channels), they do not."""

GROUPED_BYTES = 1 << 21
"""About the most memory that one block of samples of :func:`_grouped_jacobian` takes (inputs,
output gradients and weight gradients): always in the Gramian's step
(:meth:`~torchjd.autogram.Engine.compute_gramian`), and in the fused step beyond
``GROUPED_WHOLE_BYTES`` or with several objectives per sample or calls (whole, oneDNN's buffers
for large kernels take fresh memory at each step, a page fault per page). By blocks, the
kernel's temporaries (its copies of the block's inputs, output gradients and weight gradients in
its own layouts) stay small: on cnn64 of ``benchmarks/autogram_memory.py``, the second layer's
rule holds 2.6 MiB beyond its 4.5 MiB of per-objective gradients (11 samples a block), instead of
the 10.5 MiB of a convolution over all the samples (its weight and its temporaries)."""

GROUPED_WHOLE_BYTES = 1 << 24
"""The most memory (inputs, output gradients and weight gradients of all the samples) for which
:func:`_grouped_jacobian`, in the fused step, with one call and one objective per sample, runs one
convolution for all the samples and takes its weight gradient as the per-objective gradients (no
copy into a buffer). On one CPU thread, cnn64's second layer of ``benchmarks/autogram_step.py``
(``[64, 32, 16, 16]`` inputs, a 32 to 64 map, 11 MiB): 5.9 ms instead of 6.2-6.3 by blocks of
``GROUPED_BYTES`` and 0.35-0.5 ms of copies, without page faults (the heap is kept: see
``_workspace.raise_heap_thresholds``). Not in the Gramian's step, whose peak memory it set on
cnn64 (10.5 MiB beyond the per-objective gradients, against 4 MiB of output gradients)."""

TRIANGLE_MIN_ROWS = 64
"""The fewest rows of per-objective gradients whose Gramian is formed by triangle (see
:func:`_blocks_gram`): fewer, the smaller products run slower than the saved half gains."""

TRIANGLE_MIN_COLUMNS = 2048
"""The fewest columns (over all blocks) of per-objective gradients whose Gramian is formed by
triangle: fewer, the thin products run slower than the saved half gains."""

LOOP_MIN_WIDTH = 32
r"""The narrowest patches (:math:`C_{in}/g \cdot \prod_{k > 1} k` columns) for which the rule
loops over the offsets of the first kernel dimension instead of unfolding it: narrower, the
products are too thin to run at full speed (a first layer on 3 channels), and unfolding everything
is faster."""


def conv_rule(module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
    assert isinstance(module, Conv)
    n, g = len(module.kernel_size), module.groups
    grads = [_grads(c, n, g) for c in calls]  # each [R, B, g, C_out/g, T]
    R, B = grads[0].shape[:2]
    T = sum(gamma.shape[4] for gamma in grads)
    d_in, d_out = module.weight[0].numel(), module.out_channels // g
    per_objective = module.weight.requires_grad and per_objective_is_cheaper(B, R, T, d_in, d_out)
    looped = per_objective and _loops_first_offsets(module, calls)
    size = grads[0].element_size()
    jacobian_bytes = B * R * module.weight.numel() * size
    gamma_bytes = sum(gamma.numel() for gamma in grads) * size
    keep = keeps_jacobian(jacobian_bytes, gamma_bytes)
    whole = _jacobian_fits(jacobian_bytes, gamma_bytes, keep)
    grouped = per_objective and whole and _grouped_is_faster(module, grads[0])
    with_bias = module.bias is not None and module.bias.requires_grad
    folded = with_bias and per_objective and not (looped or grouped)  # the bias in J (ones in X)
    sums = None
    if with_bias and not folded and not grouped:  # grouped: from its kernels (see below)
        total = sum(gamma.sum(dim=4) for gamma in grads)  # [R, B, g, C_out/g]
        sums = total.permute(1, 0, 2, 3).reshape(B, R, -1)  # type: ignore[union-attr]
    G: Tensor | int = 0 if sums is None else gram(sums)
    if not module.weight.requires_grad:
        return G  # type: ignore[return-value]
    if not per_objective:  # the closed form
        Gamma = cat([gamma.permute(2, 1, 0, 4, 3) for gamma in grads], dim=3)
        X = cat([_patches(module, c) for c in calls], dim=2)  # [g, B, T, d_in]
        return G + weight_gramian(X, Gamma)
    if whole:
        if grouped:
            J, sums = _grouped_jacobian(module, calls, with_bias)
            if sums is not None:  # (G was 0: no sums before)
                G = gram(sums)
        else:
            J = _per_objective_jacobian(module, calls, grads, looped, slice(None), folded)
        if keep:  # for the fused step, in place of Γ
            calls[0].saved["jacobian"] = (J, sums, folded, grouped)
            for call in calls:
                call.grad_outputs = [None] * len(call.grad_outputs)
        return G + _objectives_gram(J, B)
    blocks = -(-jacobian_bytes // CHUNK_BYTES)
    step = -(-d_out // blocks)  # output channels (of each group), in blocks of equal sizes
    for start in range(0, d_out, step):
        channels = slice(start, start + step)
        J = _per_objective_jacobian(module, calls, grads, looped, channels, folded)
        G = G + _objectives_gram(J, B)
    return G  # type: ignore[return-value]


def conv_weighted_gradients(
    module: nn.Module, calls: Sequence[ModuleCall], W: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """The gradients of the weighted objectives w.r.t. the trainable parameters of ``module``.

    :param W: The weights ``[B, R]`` of the objectives.
    """
    assert isinstance(module, Conv)
    if "jacobian" in calls[0].saved:
        # J: [K, R B, g (width + folded) C_out/g], width = C_in/g prod(kernel[K > 1:]); when
        # grouped, [1, R B, C_out C_in/g prod(kernel)] (the weight's layout)
        J, sums, folded, grouped = calls[0].saved["jacobian"]
        K, (C_out, C_in_g) = J.shape[0], module.weight.shape[:2]
        g = module.groups
        w = W.T.reshape(-1).to(J.dtype)
        grad = (w @ J[0]).unsqueeze(0) if K == 1 else w @ J  # one block: a matrix's product
        if grouped:
            pairs = [(module.weight, grad.reshape(module.weight.shape))]
        else:
            grad = grad.reshape(K, g, -1, C_out // g)
            kernel = module.kernel_size[1:] if K > 1 else module.kernel_size
            weight_grad = grad[:, :, :-1] if folded else grad
            weight_grad = weight_grad.reshape(K, g, C_in_g, *kernel, C_out // g).movedim(-1, 2)
            weight_grad = weight_grad.reshape(K, C_out, C_in_g, *kernel).movedim(0, 2)
            pairs = [(module.weight, weight_grad.reshape(module.weight.shape).contiguous())]
        if folded:  # the row of ones: the sums of the output gradients
            return [*pairs, (module.bias, grad[0, :, -1].reshape(C_out))]
        if sums is None:
            return pairs
        return [*pairs, (module.bias, torch.einsum("ir,ird->d", W.to(sums.dtype), sums))]
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


def _jacobian_fits(jacobian_bytes: int, gamma_bytes: int, keep: bool) -> bool:
    """Whether the per-objective gradients are formed whole: when no larger than the output
    gradients or than ``CHUNK_BYTES``, or, when kept in place of the output gradients, than both
    together (the blocks would take about as much memory)."""
    bound = gamma_bytes + CHUNK_BYTES if keep else max(CHUNK_BYTES, gamma_bytes)
    return jacobian_bytes <= bound


def _loops_first_offsets(module: Conv, calls: Sequence[ModuleCall]) -> bool:
    """Whether :func:`_per_objective_jacobian` loops over the offsets of the first kernel
    dimension (patches at least ``LOOP_MIN_WIDTH`` wide without it, one image per sample)."""
    width = module.in_channels // module.groups * _prod(module.kernel_size[1:])
    n = len(module.kernel_size)
    one_image = all(
        c.batch_dim is not None or c.args[0].dim() == n + 1 or c.args[0].shape[0] == 1
        for c in calls
    )
    return module.kernel_size[0] > 1 and width >= LOOP_MIN_WIDTH and one_image


def _grouped_is_faster(module: Conv, gamma: Tensor) -> bool:
    """Whether :func:`_grouped_jacobian` is the faster way to the per-objective gradients: on the
    CPU with oneDNN, in float32, for patches at least ``GROUPED_MIN_WIDTH`` wide."""
    return (
        gamma.device.type == "cpu"
        and gamma.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and module.weight[0].numel() >= GROUPED_MIN_WIDTH
    )


def _grouped_jacobian(
    module: Conv, calls: Sequence[ModuleCall], with_bias: bool
) -> tuple[Tensor, Tensor | None]:
    r"""The per-objective weight gradients :math:`J_{ir}`, summed over the calls, as
    ``[1, R B, C_out C_in/g prod(kernel)]`` (rows :math:`(r, i)`, each in the weight's layout):
    for each objective of a sample, the weight gradient of one convolution with a group per
    sample and group of the module, the samples side by side along the channels (the images of
    a sample along its batch dimension), from the output gradients of that objective
    (``convolution_backward``; no patches formed). With ``with_bias``, also the bias's
    per-objective gradients :math:`\sum_t \gamma_{irt}` ``[B, R, C_out]``, as that
    convolution's bias gradient (in the same pass over the output gradients), else None.

    In the fused step, with one call and one objective per sample, when the inputs, output
    gradients and weight gradients of all the samples take at most ``GROUPED_WHOLE_BYTES``, one
    convolution for all the samples, whose weight gradient is :math:`J` itself (no copy). Else
    on blocks of samples of about ``GROUPED_BYTES`` (inputs, output gradients and weight
    gradients) each, written into one buffer (the engine's in a fused step: see ``_workspace.py``;
    fresh memory in the Gramian's step): the kernel's own buffers then stay
    small, and reuse the allocator's memory from block to block. The kernel's weight, whose
    values are not read, is then the block's rows of that buffer (its first objective's): no
    memory of its own."""
    n, g = len(module.kernel_size), module.groups
    J: Tensor | None = None
    sums: Tensor | None = None
    for call in calls:
        gamma = call.grad_output()  # [R, (N,) C_out, *positions]
        if gamma.dim() == n + 2:  # an unbatched input
            gamma = gamma.unsqueeze(1)
        # [R, B, N', C_out, *positions]: the samples, then the images of each sample
        gamma = gamma.unsqueeze(1) if call.batch_dim is None else gamma.unsqueeze(2)
        R, B, N = gamma.shape[:3]
        x = _samples_first(call.args[0], call.batch_dim, n)  # [B, N', C_in, *spatial]
        size = gamma.element_size()
        sample_bytes = (x[0].numel() + gamma[0, 0].numel() + module.weight.numel()) * size
        whole = fusing() and len(calls) == 1 and R == 1 and B * sample_bytes <= GROUPED_WHOLE_BYTES
        blocks = 1 if whole else -(-B * sample_bytes // GROUPED_BYTES)
        step = -(-B // blocks)  # samples, in blocks of equal sizes
        if J is None and not whole:  # all written
            J = empty(module, "grouped_jacobian", (R, B, module.weight.numel()), gamma)
        if sums is None and with_bias and not whole:
            sums = gamma.new_empty(B, R, module.out_channels)
        for first in range(0, B, step):
            block = x[first : first + step]
            b = block.shape[0]
            block = block.transpose(0, 1).reshape(N, -1, *x.shape[3:]).to(gamma.dtype)
            block, padding = _padded(module, block)
            weight_shape = (b * module.out_channels, *module.weight.shape[1:])
            if J is None:  # whole
                weight = _unread_weight(gamma, weight_shape)
            else:  # J's rows of the block (of the first objective) as its stand-in: no new memory
                weight = J[0, first : first + b].view(weight_shape)
            for r in range(R):
                grad_output = gamma[r, first : first + b].transpose(0, 1)
                _, grad, bias_grad = torch.ops.aten.convolution_backward(
                    grad_output.reshape(N, -1, *gamma.shape[4:]), block, weight,
                    [b * module.out_channels] if with_bias else None, module.stride, padding,
                    module.dilation, False, [0] * n, b * g, [False, True, with_bias],
                )  # fmt: skip
                if whole:  # J itself, and the sums
                    J = grad.reshape(1, B, -1)
                    sums = bias_grad.reshape(B, 1, -1) if with_bias else None
                    continue
                assert J is not None
                targets = [(J[r, first : first + b], grad)]
                if sums is not None:
                    targets.append((sums[first : first + b, r], bias_grad))
                for target, value in targets:  # the first call's written, the others' added
                    (target.copy_ if call is calls[0] else target.add_)(value.reshape(b, -1))
    assert J is not None
    return J.reshape(1, J.shape[0] * J.shape[1], -1), sums


def _unread_weight(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A weight of ``shape`` for ``convolution_backward`` when only its shape counts (neither the
    input's gradient asked for, nor a derivative): uninitialised memory, of the dtype and device of
    ``like``. The kernel takes a contiguous copy of its weight: of an expanded zero stand-in, a
    write of the whole weight (cnn64's second convolution in ``benchmarks/autogram_step.py``,
    ``[4096, 32, 3, 3]``: 0.15 ms a step on one CPU thread)."""
    return like.new_empty(shape)


def _per_objective_jacobian(
    module: Conv,
    calls: Sequence[ModuleCall],
    grads: list[Tensor],
    looped: bool,
    channels: slice,
    ones: bool = False,
) -> Tensor:
    r"""The per-objective weight gradients :math:`J_{ir}` for the output ``channels`` (of each
    group), summed over the calls, as ``[K, R B, g width c]`` (rows :math:`(r, i)`; ``width =
    C_in/g prod(kernel[K > 1:])``, ``c`` channels): :math:`K = k_1` blocks :math:`J^{(a)}` when
    ``looped`` (see the module's docstring), else one block. One batched product per block,
    objective of a sample, and block of samples (at most ``PATCH_BYTES`` of patches), the patches
    on the left (faster for narrow patches).

    :param grads: The output gradients of the calls, each ``[R, B, g, C_out/g, T]``.
    :param ones: Not when ``looped``: the patches get one more row, of ones, so that ``width``
        has one more entry, the bias's per-objective gradients :math:`\sum_t \gamma_{irt}`
        (without a pass of their own over the output gradients).
    """
    g, kernel = module.groups, module.kernel_size
    K = kernel[0] if looped else 1
    width = module.in_channels // g * _prod(kernel[1:] if looped else kernel) + ones
    J = None
    for call, gamma in zip(calls, grads, strict=True):
        gamma = gamma[:, :, :, channels]
        R, B, _, c, T = gamma.shape
        if J is None:
            J = gamma.new_empty(K, R, B, g, width, c)
        x = _samples_first(call.args[0], call.batch_dim, len(kernel))
        T_1 = call.outputs[0].shape[-len(kernel)]  # output positions along the first dimension
        S = module.stride[0] if looped else 1
        blocks = -(-g * width * S * T * gamma.element_size() * B // PATCH_BYTES)
        step = -(-B // blocks)  # samples, in blocks of equal sizes
        # with ones: the memory of a block's patches, reused from block to block
        buffer = empty(module, "patches", (step * g, width, 1, T), x) if ones else None
        for first in range(0, B, step):
            padded = _pad_images(module, x[first : first + step])
            X = _patch_matrix(module, padded, looped, buffer)
            X = X.to(gamma.dtype)  # [b g, width, S, positions]
            for a in range(K):
                X_a = _offset_columns(module, X, a, T_1, T) if looped else X[:, :, 0]
                for r in range(R):
                    rows = gamma[r, first : first + step].reshape(-1, c, T)  # [b g, c, T]
                    out = J[a, r, first : first + step].view(-1, width, c)
                    if call is calls[0]:
                        torch.bmm(X_a, rows.mT, out=out)
                    else:
                        out.baddbmm_(X_a, rows.mT)
    assert J is not None
    return J.reshape(K, J.shape[1] * J.shape[2], -1)


def _objectives_gram(J: Tensor, B: int) -> Tensor:
    r""":math:`\sum_a J^{(a)} {J^{(a)}}^\top` of blocks ``[K, R B, *]`` with rows :math:`(r, i)`,
    as ``[B R, B R]`` (rows :math:`(i, r)`)."""
    return by_sample(_blocks_gram(J), J.shape[1] // B)


def _blocks_gram(J: Tensor) -> Tensor:
    r""":math:`\sum_a J^{(a)} {J^{(a)}}^\top` of blocks ``[K, n, *]``. In float32 on the CPU with
    oneDNN, from ``_onednn.MIN_ELEMENTS`` elements per block on, by oneDNN's matrix products (see
    ``_onednn.py``). Else, from ``TRIANGLE_MIN_ROWS`` rows and ``TRIANGLE_MIN_COLUMNS``
    columns on, its lower triangle by blocks of rows (of ``n / 8`` rows, at least
    ``TRIANGLE_MIN_ROWS / 4``): each block of rows against itself and the rows above it (one
    batched product over the blocks :math:`a` each; about half of the products); the upper
    triangle is the transpose of the lower one."""
    K, n = J.shape[:2]
    if onednn_gram_is_faster(J):
        return onednn_blocks_gram(J)
    if n < TRIANGLE_MIN_ROWS or K * J.shape[2] < TRIANGLE_MIN_COLUMNS:
        G = J[0] @ J[0].T
        for block in J[1:]:
            G.addmm_(block, block.T)
        return G

    def write(rows: Tensor, start: int, end: int) -> None:
        products = torch.bmm(J[:, start:end], J[:, :end].mT)  # [K, rows, end]
        rows.copy_(products[0] if K == 1 else products.sum(dim=0))

    return lower_triangle_gram(J, max(n // 8, TRIANGLE_MIN_ROWS // 4, 1), write)


def _offset_columns(module: Conv, X: Tensor, a: int, T_1: int, T: int) -> Tensor:
    """The patches ``[b g, width, T]`` (a view of ``X``) of the offset ``a`` of the first kernel
    dimension: the rows :math:`a d_1 + t s_1` (:math:`t < T_1`), in phase :math:`a d_1 \\bmod s_1`
    of the stride."""
    row, S = a * module.dilation[0], X.shape[2]
    start = row // S * (T // T_1)  # the positions of the other dimensions at each row
    return X[:, :, row % S, start : start + T]


def _grads(call: ModuleCall, n: int, g: int) -> Tensor:
    """``[R, B, g, C_out/g, T]`` (a view when each sample has one image) from the output gradients
    ``[R, (N,) C_out, *positions]``."""
    gamma = call.grad_output()
    if gamma.dim() == n + 2:  # an unbatched input
        gamma = gamma.unsqueeze(1)
    R, N, C_out = gamma.shape[:3]
    gamma = gamma.reshape(R, N, g, C_out // g, -1)
    if call.batch_dim is None:  # one sample: its N images along the positions
        return gamma.permute(0, 2, 3, 1, 4).reshape(R, 1, g, C_out // g, -1)
    return gamma


def _samples_first(x: Tensor, batch_dim: int | None, n: int) -> Tensor:
    """``[B, N', C, *spatial]``: the samples, then the images of each sample."""
    if x.dim() == n + 1:  # an unbatched input
        x = x.unsqueeze(0)
    return x.unsqueeze(0) if batch_dim is None else x.unsqueeze(1)


def _patches(module: Conv, call: ModuleCall) -> Tensor:
    """``[g, B, T, C_in/g * prod(kernel)]`` (a transposed view): the patches that each output
    position of ``call`` sees."""
    x = _samples_first(call.args[0], call.batch_dim, len(module.kernel_size))
    X = _patch_matrix(module, _pad_images(module, x), looped=False)  # [B g, d_in, 1, T]
    return X.reshape(x.shape[0], module.groups, X.shape[1], -1).permute(1, 0, 3, 2)


def _pad_images(module: Conv, x: Tensor) -> Tensor:
    """The images ``[B, N', C, *spatial]``, padded as the module pads them."""
    padded = F.pad(x.flatten(0, 1), _pad_amounts(module), mode=_pad_mode(module))
    return padded.reshape(*x.shape[:3], *padded.shape[2:])


def _patch_matrix(module: Conv, x: Tensor, looped: bool, buffer: Tensor | None = None) -> Tensor:
    """``[B g, width, S, positions]`` (one copy) from padded images ``x`` ``[B, N', C, *spatial]``:
    the patches that each output position sees, ``width = C_in/g * prod(kernel)`` and ``S = 1``
    unless ``looped`` (one image per sample): then the first kernel dimension is not unfolded,
    ``width = C_in/g * prod(kernel[1:])``, and the padded rows of the first spatial dimension are
    split into the ``S`` phases of its stride (the positions: the rows of a phase, then the output
    positions of the other dimensions). With a ``buffer`` (not ``looped``), one more row, of ones:
    ``[B g, width + 1, 1, positions]``, in the first rows of ``buffer`` (at least ``B g`` rows,
    so that blocks of fewer samples reuse it): no fresh memory for each block (on one CPU thread,
    the patches of cnn64's first convolution in ``benchmarks/autogram_step.py``, 16 samples a
    block, 0.08 ms instead of 0.15)."""
    B, N, C = x.shape[:3]
    n = len(module.kernel_size)
    x = x.flatten(0, 1)
    if looped:
        S = module.stride[0]
        extra = -x.shape[2] % S  # rows of zeros, never read, so that the phases have equal rows
        if extra:
            x = F.pad(x, [0, 0] * (n - 1) + [0, extra])
        x = x.unflatten(2, (-1, S)).transpose(2, 3)  # [B N', C, S, rows, *spatial[1:]]
    lead = 2 + looped
    for s in range(int(looped), n):
        k, stride, dilation = module.kernel_size[s], module.stride[s], module.dilation[s]
        x = x.unfold(lead + s, (k - 1) * dilation + 1, stride)[..., ::dilation]
    # [B N', C, (S,) *positions, *kernel] -> [B, C, *kernel, (S,) N', *positions]: one copy
    x = x.reshape(B, N, *x.shape[1:])
    positions = list(range(3 + looped, 3 + looped + n))
    kernel = list(range(3 + looped + n, x.dim()))
    order = [0, 2, *kernel, *([3] if looped else []), 1, *positions]
    width = C // module.groups * _prod([x.shape[k] for k in kernel])
    S = module.stride[0] if looped else 1
    if buffer is None:
        return x.permute(order).reshape(B * module.groups, width, S, -1)
    # one copy, into the buffer, with a last row of ones
    x = x.permute(order)  # [B, C, *kernel, N', *positions]
    kernel_shape, rest = x.shape[2 : 2 + n], x.shape[2 + n :]
    X = buffer[: B * module.groups]
    patches = X[:, :width, 0].view(B, module.groups, -1, *kernel_shape, *rest)
    patches.copy_(x.reshape(patches.shape))
    X[:, width].fill_(1)
    return X


def _padded(module: Conv, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` and the zero padding for ``convolution_backward``: other padding modes (and string
    paddings) applied to ``x`` beforehand."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return F.pad(x, _pad_amounts(module), mode=_pad_mode(module)), (0,) * len(
            module.kernel_size
        )
    return x, _padding_tuple(module)


def _pad_amounts(module: Conv) -> list[int]:
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


def _padding_tuple(module: Conv) -> tuple[int, ...]:
    if isinstance(module.padding, str):
        return (0,) * len(module.kernel_size)
    return tuple(module.padding)


def _pad_mode(module: Conv) -> str:
    return "constant" if module.padding_mode == "zeros" else module.padding_mode


def _prod(values: Sequence[int]) -> int:
    result = 1
    for v in values:
        result *= v
    return result
