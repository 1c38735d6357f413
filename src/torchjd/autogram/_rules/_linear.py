r"""Linear layers in closed form.

With inputs :math:`X_i` (positions :math:`\times d_{in}`) and output gradients :math:`\Gamma_{ir}`
(positions :math:`\times d_{out}`) of objective :math:`(i, r)`, the gradient w.r.t. the weight is
:math:`\Gamma_{ir}^\top X_i`, so

.. math::

    G^W_{ir,js} = \langle X_i X_j^\top,\ \Gamma_{ir} \Gamma_{js}^\top \rangle_F
                = \sum_{t,u} (x_{it} \cdot x_{ju})(\gamma_{irt} \cdot \gamma_{jsu}),
    \qquad
    G^b_{ir,js} = \Big(\sum_t \gamma_{irt}\Big) \cdot \Big(\sum_u \gamma_{jsu}\Big).

With one position this is :math:`(X X^\top) \odot (\Gamma \Gamma^\top)`. When the positions are many
and the layer is narrow, forming the per-objective gradients :math:`\Gamma_{ir}^\top X_i` is
cheaper: each call picks the cheaper of the two by counting flops, and forms its intermediates
(per-objective gradients, or the products :math:`x_{it} \cdot x_{ju}` and
:math:`\gamma_{irt} \cdot \gamma_{jsu}`) block by block, so that none exceeds ``CHUNK_BYTES``
(long sequences, large images). Per-objective gradients that are not kept for the fused step
are formed by blocks of about ``BLOCK_BYTES`` in one reused buffer (for a convolution's groups,
with one objective per sample), each block's Gramian taken right away (from 32 rows on, by
blocks of rows, only those on and above the diagonal: see :func:`gram_parts`). The calls of a
module are concatenated along the positions, which accounts for the cross terms between calls.
Convolutions reuse this kernel with one block per group (see ``_conv.py``). With one objective
per sample and the blocks' Gramians from oneDNN, a leaner form of that path (see
:func:`add_lean_gramian`) also folds the bias in.

For the fused step (:meth:`~torchjd.autogram.Engine.backward`), the gradient of the weighted
objectives :math:`\sum_{ir} w_{ir} \ell_{ir}` comes from the same recorded quantities, without a
second backward pass: with the weighted output gradient
:math:`\bar\Gamma_i = \sum_r w_{ir} \Gamma_{ir}`,

.. math::

    \nabla_W = \sum_i \bar\Gamma_i^\top X_i, \qquad \nabla_b = \sum_i \sum_t \bar\gamma_{it}.

When a layer's per-objective gradients :math:`J_{ir} = \Gamma_{ir}^\top X_i` are the Gramian's
cheaper path and not much larger than :math:`\Gamma` (see :func:`linear_keeps_jacobian`), the
rule forms them whole, one product per objective of the samples from a view of :math:`\Gamma`,
takes their Gramian, and keeps them (with :math:`\sum_t \gamma_{irt}`) in place of
:math:`\Gamma`: :math:`\nabla_W = \sum_{ir} w_{ir} J_{ir}` then reads :math:`B R\, d_{out} d_{in}`
numbers instead of a product of :math:`B T\, d_{out} d_{in}` multiply-adds. On the CPU they are
formed in a buffer that the engine keeps from step to step (see ``_workspace.py``): fresh memory
would cost a page fault per page at every step. The cost: their memory (at most
``SMALL_KEEP_RATIO`` times that of :math:`\Gamma`, or ``KEEP_RATIO`` times beyond
``CHUNK_BYTES``), held between steps too (on one CPU thread, the Transformer encoder of
``benchmarks/autogram_step.py``, 2 layers with 32 samples of 32 positions: 32 MiB in place of
7 MiB of output gradients, and a fused step about 10 % faster, 1.74 times the ERM step instead of
1.98; with 4 objectives per sample, 80 MiB).
With ``max_kept_bytes`` (see :meth:`~torchjd.autogram.Engine.backward`), those that do not fit
are released once their Gramian is taken, as output gradients are.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchjd.autogram._module_call import (
    ModuleCall,
    cat,
    gram,
    positions,
    samples_first,
    samples_objectives_first,
)
from torchjd.autogram._onednn import (
    WHOLE_MAX_ROWS,
    blocks_gram,
    onednn_add_self_gram,
    onednn_gram,
    onednn_gram_is_faster,
    onednn_linear,
    onednn_takes,
    symmetric,
    transposed_product,
)
from torchjd.autogram._workspace import empty, fusing


def linear_rule(module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
    assert isinstance(module, nn.Linear)
    with_bias = module.bias is not None and module.bias.requires_grad
    single = _one_position_call(calls)
    if single is not None and module.weight.requires_grad:  # [B, d_in] inputs, the usual MLP
        x, gamma = single
        R, B, d_out = gamma.shape
        if _one_position_fits(B, R, x.shape[1], d_out, gamma.element_size()):
            return one_position_gramian(x, gamma.movedim(0, 1), with_bias)
    X = cat([positions(samples_first(c.args[0], c.batch_dim), 1) for c in calls], dim=1)
    Gamma = cat(
        [positions(samples_objectives_first(c.grad_output(), c.batch_dim), 2) for c in calls],
        dim=2,
    )  # [B, R, T, d_out]
    G: Tensor | int = 0
    J: Tensor | None = None
    B, R, T, d_out = Gamma.shape
    if (
        module.weight.requires_grad
        and T == 1
        and _one_position_fits(B, R, X.shape[-1], d_out, Gamma.element_size())
    ):
        return one_position_gramian(X[:, 0], Gamma[:, :, 0], with_bias)
    if module.weight.requires_grad and lean_applies(X, Gamma):
        return symmetric(add_lean_gramian(None, X, Gamma, with_bias))
    if module.weight.requires_grad:
        # Per-objective gradients formed whole (when the cheaper path and not much larger than
        # Γ): kept for the fused step instead of Γ.
        G, J = weight_gramian_and_jacobian(X, Gamma, module)
    sums = Gamma.sum(dim=2) if with_bias else None
    if sums is not None:
        G = G + gram(sums)
    if J is not None:
        calls[0].saved["jacobian"] = (J, sums)
        for call in calls:  # what the fused step needs is kept: release Γ
            call.grad_outputs = [None] * len(call.grad_outputs)
    return G  # type: ignore[return-value]


def one_position_gramian(X: Tensor, Gamma: Tensor, with_bias: bool) -> Tensor:
    r"""The Gramian of a Linear layer with one position per sample, its bias folded in:
    :math:`G_{ir,js} = (x_i \cdot x_j + 1)(\gamma_{ir} \cdot \gamma_{js})` (without the
    :math:`+ 1` when the bias is not trained): two products, one of them shared by the weight and
    the bias.

    :param X: Inputs ``[B, d_in]``.
    :param Gamma: Output gradients ``[B, R, d_out]``. Returns ``[B R, B R]``.
    """
    B, R, _ = Gamma.shape
    K = self_gram(X if X.dtype == Gamma.dtype else X.to(Gamma.dtype))
    if with_bias:
        K += 1.0
    L = self_gram(Gamma.reshape(B * R, -1))
    if R == 1:
        return K.mul_(L)
    return (K.reshape(B, 1, B, 1) * L.reshape(B, R, B, R)).reshape(B * R, B * R)


def gram_parts(rows: int, columns: int) -> list[tuple[int, int]]:
    """The blocks of rows ``[start, stop)`` by which :func:`add_self_gram` forms ``A Aᵀ`` for
    ``A`` of ``rows x columns``: one block, or from :data:`PARTS_MIN_ROWS` rows on and when the
    product is large enough (:data:`PARTS_MIN_PRODUCT` multiply-adds) for the flops saved to
    outweigh the extra calls, 4 blocks (2 or 3 below 64 rows, 8 from 256 rows on) of at least
    16 rows, multiples of 16 (the kernels' tiles) but the last."""
    if rows < PARTS_MIN_ROWS or rows * rows * columns < PARTS_MIN_PRODUCT:
        return [(0, rows)]
    parts = min(rows // 16, 4 if rows < 256 else 8)
    size = -(-rows // parts)
    size = -(-size // 16) * 16
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def add_self_gram(G: Tensor, A: Tensor, parts: list[tuple[int, int]]) -> None:
    """Adds ``A Aᵀ`` to ``G``: for blocks of rows ``parts`` (see :func:`gram_parts`), the rows of
    each block against those from the block on (one product per block), which
    :func:`complete_self_gram` mirrors (with ``p`` blocks, :math:`(p + 1) / 2p` of the flops);
    by oneDNN where faster (see ``_onednn.py``)."""
    if onednn_gram_is_faster(A):
        onednn_add_self_gram(G, A, parts)
        return
    for start, stop in parts:
        G[start:stop, start:].addmm_(A[start:stop], A[start:].T)


def complete_self_gram(G: Tensor, parts: list[tuple[int, int]]) -> Tensor:
    """``G`` after :func:`add_self_gram` with ``parts``: below the diagonal blocks, the transpose
    of what is above."""
    for start, stop in parts[:-1]:
        G[stop:, start:stop] = G[start:stop, stop:].T
    return G


def self_gram(A: Tensor) -> Tensor:
    """``A Aᵀ``, by blocks of rows when large enough (see :func:`gram_parts`); by oneDNN where
    faster (see ``_onednn.py``)."""
    if onednn_gram_is_faster(A):
        return onednn_gram(A)
    parts = gram_parts(*A.shape)
    if len(parts) == 1:
        return A @ A.T
    G = A.new_zeros(A.shape[0], A.shape[0])
    add_self_gram(G, A, parts)
    return complete_self_gram(G, parts)


PARTS_MIN_ROWS = 32
"""The fewest rows whose Gramian :func:`self_gram` forms by blocks of rows. On one CPU thread
(float32, 4096 to 16384 columns), 128 rows: 4 blocks of 32 take 8-11 % less time than 3 blocks
of the halves of the rows, 25-35 % less than one product; 64 rows: 4 blocks of 16 take 15-25 %
less time than one product; 32 to 63 rows (2 or 3 blocks), 8-14 % less from 8192 columns on
(the per-objective blocks of a Transformer's layers with 32 samples: the Linear rules of a layer
4-5 % faster)."""

PARTS_MIN_PRODUCT = 1 << 23
"""The fewest multiply-adds (``rows² x columns``) of a Gramian formed by blocks of rows (below,
each block's call costs more than the flops it saves)."""


def _one_position_fits(B: int, R: int, d_in: int, d_out: int, element_size: int) -> bool:
    """With one position per sample: the closed form the cheaper path, and ``[B R, B R]``
    within :data:`CHUNK_BYTES` (beyond, :func:`weight_gramian` forms it by blocks)."""
    size = (B * R) ** 2 * element_size
    return size <= CHUNK_BYTES and not per_objective_is_cheaper(B, R, 1, d_in, d_out)


def _one_position_call(calls: Sequence[ModuleCall]) -> tuple[Tensor, Tensor] | None:
    """The input ``[B, d_in]`` and output gradients ``[R, B, d_out]`` of a module called once
    on a matrix of samples (the common case, taken without reshaping), or None."""
    if len(calls) != 1:
        return None
    call = calls[0]
    x, gamma = call.args[0], call.grad_outputs[0] if call.grad_outputs else None
    if gamma is None or x.dim() != 2 or call.batch_dim != 0 or len(call.grad_outputs) != 1:
        return None
    return x, gamma


def linear_weighted_gradients(
    module: nn.Module, calls: Sequence[ModuleCall], W: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """The gradients of the weighted objectives w.r.t. the trainable parameters of ``module``
    (the weight's by ``_onednn.transposed_product``: by oneDNN in float32 on the CPU from a size
    on).

    :param W: The weights ``[B, R]`` of the objectives.
    """
    assert isinstance(module, nn.Linear)
    d_in, d_out = module.in_features, module.out_features
    if "jacobian" in calls[0].saved:
        return _weighted_rows(module, *calls[0].saved["jacobian"], W)
    single = _one_position_call(calls)
    if single is not None and W.shape[1] == 1:  # one objective per sample: Γ̄ = w ⊙ Γ
        X, gamma = single
        Gamma = (gamma[0] if gamma.dtype == W.dtype else gamma[0].to(W.dtype)) * W
    else:
        X = cat([c.args[0].reshape(-1, d_in) for c in calls], dim=0)
        Gamma = cat(
            [c.weighted_grad_output(W).reshape(-1, d_out) for c in calls], dim=0
        )  # [positions, d_out]
    grads = []
    if module.weight.requires_grad:
        X = X if X.dtype == Gamma.dtype else X.to(Gamma.dtype)
        grads.append((module.weight, transposed_product(Gamma, X)))
    if module.bias is not None and module.bias.requires_grad:
        grads.append((module.bias, Gamma.sum(dim=0)))
    return grads


def _weighted_rows(
    module: nn.Linear, J: Tensor, sums: Tensor | None, W: Tensor
) -> list[tuple[Tensor, Tensor]]:
    weight_grad, bias_grad = weighted_jacobian(J, sums, W)
    grads = [(module.weight, weight_grad.reshape(module.weight.shape))]
    if bias_grad is not None:
        grads.append((module.bias, bias_grad))
    return grads  # type: ignore[return-value]


def weighted_jacobian(J: Tensor, sums: Tensor | None, W: Tensor) -> tuple[Tensor, Tensor | None]:
    r""":math:`\sum_{ir} w_{ir} J_{ir}` ``[P]`` from the per-objective gradients ``J``
    ``[R, B, P]`` (flattened in any order, kept in the result), and
    :math:`\sum_{ir} w_{ir} \sum_t \gamma_{irt}` from the sums ``[B, R, d_out]``
    (None when None), for the weights ``W`` ``[B, R]``."""
    R, B, P = J.shape
    weight_grad = W.T.reshape(-1).to(J.dtype) @ J.reshape(R * B, P)
    if sums is None:
        return weight_grad, None
    return weight_grad, torch.einsum("ir,ird->d", W.to(sums.dtype), sums)


linear_rule.weighted_gradients = linear_weighted_gradients  # type: ignore[attr-defined]
linear_rule.fuses = lambda module, calls: True  # type: ignore[attr-defined]
linear_rule.pure = lambda module, calls: True  # type: ignore[attr-defined]


CHUNK_BYTES = 1 << 24
"""The most memory that one intermediate of :func:`weight_gramian` takes (the per-objective
gradients of a block of output features, or the closed form's products for a block of samples)."""


BLOCK_BYTES = 1 << 20
"""About the size of the blocks of per-objective gradients that the Gramian forms at once when it
does not keep them (see above): each block's Gramian is taken right after it is
formed, while it is in the cache, and every block reuses one buffer. Fresh memory is costly (a
page fault per page on its first use), and per-objective gradients formed whole are often the
largest tensor of the pass. Per objective of a sample: the products, one per objective, have as
many features with several objectives as with one (on one CPU thread, the layers of a
Transformer encoder with 32 samples, 32 positions and 4 objectives each: 64 features of 128
inputs, 6 % less time than 16; with one objective, blocks of 4 MiB, faster alone, cost more in
the Gramian pass than they save: fresh pages)."""

ONEDNN_BLOCK_BYTES = 2 << 20
"""In place of ``BLOCK_BYTES`` (for one block of inputs), about the size of the blocks of
per-objective gradients whose Gramians come from oneDNN (see ``_onednn.py``): fewer, larger
products (the first one after other work is the slowest). On one CPU thread, the Gramian of the
Transformer of ``benchmarks/autogram_step.py`` (blocks of 64 to 128 features of 128 to 256
inputs, 32 samples) 0.3-1.2 ms shorter (of 23-27) than with blocks of 1 MiB; 3 MiB gained
nothing."""

MIN_BLOCK_FEATURES = 16
"""The fewest output features per block (narrower blocks make small, inefficient products)."""


KEEP_RATIO = 2
"""The fused step keeps a layer's per-objective gradients (when the Gramian formed them whole) in
place of its output gradients when they are at most this many times larger: weighting them then
costs :math:`B R` rows instead of a product over all positions. For Linear layers, see also
``SMALL_KEEP_RATIO``."""

SMALL_KEEP_RATIO = 8
"""A Linear layer's per-objective gradients of at most ``CHUNK_BYTES`` are kept when at most this
many times larger than its output gradients: :math:`d_{in} / T` up to 8, as in a Transformer's
layers with 32 to 64 positions, whose fused step spends, in place of one product over all
positions per layer, a read of the kept rows (on one CPU thread, with 32 samples of 32 positions
and 128 to 256 features, 0.06 to 0.2 ms instead of 0.7 ms per layer; forming them whole takes no
longer than by blocks). Larger ones, only up to ``KEEP_RATIO`` (their memory matters more: with 4
objectives per sample, keeping the 24 MiB of a 128 to 384 projection made the step slower)."""


def keeps_jacobian(jacobian_bytes: int, gamma_bytes: int) -> bool:
    """Whether per-objective gradients of ``jacobian_bytes`` are kept for the fused step in place
    of output gradients of ``gamma_bytes``."""
    return jacobian_bytes <= KEEP_RATIO * gamma_bytes


def linear_keeps_jacobian(jacobian_bytes: int, gamma_bytes: int) -> bool:
    """Whether a Linear layer's per-objective gradients of ``jacobian_bytes`` are kept for the
    fused step in place of output gradients of ``gamma_bytes``: up to ``SMALL_KEEP_RATIO`` times
    larger when within ``CHUNK_BYTES``, else up to ``KEEP_RATIO`` times."""
    ratio = SMALL_KEEP_RATIO if jacobian_bytes <= CHUNK_BYTES else KEEP_RATIO
    return jacobian_bytes <= ratio * gamma_bytes


def weight_gramian(X: Tensor, Gamma: Tensor, chunk_bytes: int | None = None) -> Tensor:
    r""":math:`\sum_p G^{W_p}` for independent blocks :math:`p` (groups of a convolution).

    :param X: Inputs ``[P, B, T, d_in]``.
    :param Gamma: Output gradients ``[P, B, R, T, d_out]``.
    :param chunk_bytes: A bound on the size of each intermediate: the per-objective gradients are
        formed for a block of output features at a time, the closed form's products for a block
        of samples at a time (at least one feature or sample each). None: ``CHUNK_BYTES``.
    :returns: ``[B R, B R]``.
    """
    return _weight_gramian(X, Gamma, CHUNK_BYTES if chunk_bytes is None else chunk_bytes)


def weight_gramian_and_jacobian(
    X: Tensor, Gamma: Tensor, owner: object = None, role: str = "jacobian"
) -> tuple[Tensor, Tensor | None]:
    r""":func:`weight_gramian` for one block of inputs, and the per-objective gradients when they
    are the cheaper path and :func:`linear_keeps_jacobian` keeps them in a fused step (see
    ``_workspace.fusing``), else None.

    :param X: Inputs ``[B, T, d_in]``.
    :param Gamma: Output gradients ``[B, R, T, d_out]``.
    :param owner: With ``role``, names the engine's buffer (see ``_workspace.py``) in which the
        kept per-objective gradients are formed, from step to step. None: a new tensor.
    :returns: ``[B R, B R]``, and ``[R, B, d_out d_in]``: the weight gradient
        :math:`\Gamma_{ir}^\top X_i` (flattened) of each objective ``r`` of each sample ``i``.
    """
    B, R, _, d_out = Gamma.shape
    d_in = X.shape[-1]
    if not _keeps(X, Gamma):
        X = _adjacent_positions(X)  # Γ as it is: see _adjacent_positions
        return weight_gramian(X.unsqueeze(0), Gamma.unsqueeze(0)), None
    shape = (R, B, d_out, d_in)
    J = Gamma.new_empty(shape) if owner is None else empty(owner, role, shape, Gamma)
    X = X.to(Gamma.dtype)
    for r in range(R):  # each from a view of Γ: no copy
        torch.bmm(Gamma[:, r].mT, X, out=J[r])
    return by_sample(self_gram(J.view(R * B, -1)), R), J.view(R, B, -1)


def _keeps(X: Tensor, Gamma: Tensor) -> bool:
    """Whether :func:`weight_gramian_and_jacobian` keeps the per-objective gradients of inputs
    ``X`` ``[B, T, d_in]`` and output gradients ``Gamma`` ``[B, R, T, d_out]``."""
    B, R, T, d_out = Gamma.shape
    d_in = X.shape[-1]
    size = Gamma.element_size()
    return (
        fusing()
        and per_objective_is_cheaper(B, R, T, d_in, d_out)
        and linear_keeps_jacobian(B * R * d_out * d_in * size, Gamma.numel() * size)
    )


def _lean_features(B: int, d_in: int, d_out: int, element_size: int) -> int:
    """The output features of each block of :func:`add_lean_gramian` (sized by the inputs' own
    columns, as :func:`_per_objective_gramian` sizes those whose Gramians come from oneDNN)."""
    feature_bytes = B * d_in * element_size
    return block_features(d_out, feature_bytes, CHUNK_BYTES, 1, ONEDNN_BLOCK_BYTES)


def lean_applies(X: Tensor, Gamma: Tensor) -> bool:
    """Whether :func:`add_lean_gramian` gives the Gramian of a map of inputs ``X``
    ``[B, T, d_in]`` and output gradients ``Gamma`` ``[B, R, T, d_out]``: one objective per
    sample, several positions, at most ``_onednn.WHOLE_MAX_ROWS`` samples, the per-objective
    gradients the cheaper path (the inputs with one more column) and not kept (see
    :func:`weight_gramian_and_jacobian`), and their blocks' Gramians from oneDNN."""
    B, R, T, d_out = Gamma.shape
    d_in = X.shape[-1]
    if (
        R != 1
        or T == 1
        or B > WHOLE_MAX_ROWS
        or not per_objective_is_cheaper(B, R, T, d_in + 1, d_out)
        or _keeps(X, Gamma)
    ):
        return False
    features = _lean_features(B, d_in, d_out, Gamma.element_size())
    return onednn_takes(Gamma.dtype, Gamma.device, B * features * (d_in + 1))


def add_lean_gramian(G: Tensor | None, X: Tensor, Gamma: Tensor, bias: bool) -> Tensor:
    r"""``G`` (None: zero) plus the Gramian of a map's weight, and of its bias when ``bias``,
    where :func:`lean_applies` (oneDNN's products: nearly symmetric, see
    :func:`~torchjd.autogram._onednn.symmetric`).

    The path of :func:`_per_objective_gramian` for one objective per sample and blocks whose
    Gramians oneDNN forms whole, in few operations: between its large products, which empty the
    caches, each small operation costs several times what it costs alone. The inputs are copied
    with their positions adjacent and, with ``bias``, a column of ones: the last column of each
    product :math:`\Gamma_i^\top [X_i\ 1]` is the bias's gradient :math:`\sum_t \gamma_{it}`,
    so that one Gramian covers both parameters (no pass over :math:`\Gamma` for the sums, nor a
    Gramian of theirs), and the products read inputs that the copy brought into the caches. On one
    CPU thread, the Transformer of ``benchmarks/autogram_step.py`` (32 samples of 32 positions):
    its layers' rules 0.5 to 0.9 ms shorter per step than by the general path (of 13 to 19 ms).
    Where a block holds at least half as many features as the inputs' columns, it is formed
    transposed, :math:`[X_i\ 1]^\top \Gamma_i` (the same Gramian: each row's entries in another
    order), from a view of :math:`\Gamma` read along its features: with an attention's output
    gradients, whose positions are ``B`` rows apart, these products take less time than
    :math:`\Gamma_i^\top [X_i\ 1]`; with narrower blocks (more inputs than features), longer. In
    that Transformer's IWRM step, its rules 0.5 to 0.8 ms shorter (of 12 to 13) than with every
    block as :math:`\Gamma_i^\top [X_i\ 1]`.

    :param X: Inputs ``[B, T, d_in]``.
    :param Gamma: Output gradients ``[B, 1, T, d_out]``.
    """
    B, _, T, d_out = Gamma.shape
    d_in = X.shape[-1]
    width = d_in + 1 if bias else d_in
    inputs = Gamma.new_empty(B, T, width)
    inputs[..., :d_in] = X
    if bias:
        inputs[..., d_in].fill_(1.0)
    step = _lean_features(B, d_in, d_out, Gamma.element_size())
    buffer = Gamma.new_empty(B * width * step)
    flipped = 2 * step >= width
    linear = onednn_linear()
    assert linear is not None  # lean_applies checked it
    for start in range(0, d_out, step):
        features = min(step, d_out - start)  # a narrower last block
        block = Gamma[:, 0, :, start : start + features]  # [B, T, features]: a view
        if flipped:
            out = buffer[: B * width * features].view(B, width, features)
            torch.bmm(inputs.mT, block, out=out)
        else:
            out = buffer[: B * width * features].view(B, features, width)
            torch.bmm(block.mT, inputs, out=out)
        rows = out.view(B, -1)
        product = linear(rows, rows)
        G = product if G is None else G.add_(product)
    assert G is not None  # d_out > 0
    return G


def by_sample(G: Tensor, R: int) -> Tensor:
    """A Gramian ``[R B, R B]`` whose rows are ordered by objective then sample, ``(r, i)``,
    reordered by sample then objective, ``(i, r)`` (the engine's order)."""
    if R == 1:
        return G
    B = G.shape[0] // R
    return G.reshape(R, B, R, B).permute(1, 0, 3, 2).reshape(B * R, B * R)


def _adjacent_positions(tensor: Tensor) -> Tensor:
    """``tensor`` ``[..., T, d]``, copied (contiguous) when the positions of a sample are not
    adjacent rows: the rows of the inputs of a map found in an attention's graph (see
    ``_graph_linear.py``) are ``[T B, d]``, a sample's positions ``B`` rows apart (with 32 samples
    of 128 features, 16 KiB apart, which the products read slowly). The per-objective gradients
    that are kept are formed from the views (written to memory, their formation gains nothing
    from the copy). The output gradients are not copied: with the blocks' Gramians from oneDNN
    (see ``_onednn.py``), the Gramian of ``benchmarks/autogram_step.py``'s Transformer took as
    long or 0.2-0.4 ms less (of 27) without that copy, whose 1.5 MiB (the gradients of an
    attention's input projection) made the peak of the Gramian's pass with blocks of
    ``ONEDNN_BLOCK_BYTES``."""
    if tensor.shape[-2] > 1 and tensor.stride(-2) != tensor.shape[-1]:
        return tensor.contiguous()
    return tensor


def block_features(
    d_out: int,
    feature_bytes: int,
    chunk_bytes: int,
    objectives: int = 1,
    block_bytes: int | None = None,
) -> int:
    """The number of output features whose per-objective gradients are formed at once: about
    ``block_bytes`` (None: ``BLOCK_BYTES``) of them per objective of a sample (``objectives``
    each; at least ``MIN_BLOCK_FEATURES`` features), at most ``chunk_bytes`` (at least one
    feature)."""
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    step = max(block_bytes * objectives // feature_bytes, MIN_BLOCK_FEATURES)
    return max(1, min(step, chunk_bytes // feature_bytes, d_out))


def per_objective_is_cheaper(B: int, R: int, T: int, d_in: int, d_out: int) -> bool:
    """Whether forming the per-objective gradients (then their Gramian) takes fewer flops than
    the closed form, for ``B`` samples, ``R`` objectives each, ``T`` positions."""
    closed_form_flops = (B * T) ** 2 * d_in + (B * R * T) ** 2 * (d_out + 1)
    per_objective_flops = B * R * T * d_out * d_in + (B * R) ** 2 * d_out * d_in
    return per_objective_flops < closed_form_flops


def _weight_gramian(X: Tensor, Gamma: Tensor, chunk_bytes: int) -> Tensor:
    P, B, R, T, d_out = Gamma.shape
    d_in = X.shape[-1]
    X = X.to(Gamma.dtype)
    size = Gamma.element_size()
    if per_objective_is_cheaper(B, R, T, d_in, d_out):
        return _per_objective_gramian(X, Gamma, chunk_bytes)
    # K: x_it · x_ju, L: γ_irt · γ_jsu, for the samples i of a block against all samples j.
    X_all = X.flatten(1, 2)  # [P, B T, d_in]
    Gamma_all = Gamma.flatten(1, 3)  # [P, B R T, d_out]
    step = max(1, chunk_bytes // (P * R * T * B * R * T * size))
    rows = []
    for start in range(0, B, step):
        b = min(step, B - start)
        K = X[:, start : start + b].flatten(1, 2) @ X_all.mT  # [P, b T, B T]
        L = Gamma[:, start : start + b].flatten(1, 3) @ Gamma_all.mT  # [P, b R T, B R T]
        if T == 1:
            block = (K.reshape(P, b, 1, B, 1) * L.reshape(P, b, R, B, R)).sum(dim=0)
        else:
            K, L = K.reshape(P, b, T, B, T), L.reshape(P, b, R, T, B, R, T)
            block = torch.einsum("pitju,pirtjsu->irjs", K, L)
        rows.append(block.reshape(b * R, B * R))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def _per_objective_gramian(X: Tensor, Gamma: Tensor, chunk_bytes: int) -> Tensor:
    r"""The rows :math:`\Gamma_{ir}^\top X_i` of the Jacobian, block of output features by block,
    and their Gramian. The blocks are formed in one buffer of about ``BLOCK_BYTES``,
    used right away (see above). On one block of inputs (``P = 1``), the products of a block are
    one per sample and objective, :math:`\Gamma_{ir}^\top X_i`, each from a slice of one view of
    :math:`\Gamma` (no copy), the rows ordered by objective then sample until the end; with
    several (groups of a convolution), one per sample for all its objectives at once,
    :math:`[\Gamma_{i1} \dots \Gamma_{iR}]^\top X_i`, from a transposed copy of each block's
    :math:`\Gamma` (blocks of ``CHUNK_BYTES`` with several objectives: narrow blocks make that
    copy slow)."""
    P, B, R, T, d_out = Gamma.shape
    d_in = X.shape[-1]
    feature_bytes = P * B * R * d_in * Gamma.element_size()  # one output feature's part of the rows
    if R == 1 or P == 1:
        step = block_features(d_out, feature_bytes, chunk_bytes, R)
        if P == 1:  # wider blocks where their Gramians come from oneDNN
            wide = block_features(d_out, feature_bytes, chunk_bytes, R, ONEDNN_BLOCK_BYTES)
            if onednn_takes(Gamma.dtype, Gamma.device, R * B * wide * d_in):
                step = wide
    else:
        step = max(1, min(d_out, chunk_bytes // feature_bytes))
    inputs = X.reshape(P * B, T, d_in)
    if step == d_out and P > 1:  # one block, formed whole
        grads = Gamma.transpose(2, 3).reshape(P * B, T, R * d_out)  # [P B, T, R d_out]
        J = torch.bmm(grads.mT, inputs).reshape(P, B * R, -1)  # rows (i, r)
        return blocks_gram(J)
    G = Gamma.new_zeros(B * R, B * R)
    buffer = Gamma.new_empty(P * B * R * step * d_in)
    if P == 1:
        transposed = Gamma[0].mT  # [B, R, d_out, T]
        parts = gram_parts(R * B, step * d_in)  # the same for every block (the last one too)
        for start in range(0, d_out, step):
            s = min(step, d_out - start)
            out = buffer[: R * B * s * d_in].view(R, B, s, d_in)
            for r in range(R):
                torch.bmm(transposed[:, r, start : start + s], inputs, out=out[r])
            add_self_gram(G, out.view(R * B, -1), parts)  # rows (r, i)
        return by_sample(complete_self_gram(G, parts), R)
    for start in range(0, d_out, step):
        s = min(step, d_out - start)
        block = Gamma[..., start : start + s]  # [P, B, R, T, s]
        grads = block.transpose(2, 3).reshape(P * B, T, R * s)  # [P B, T, R s]
        out = buffer[: P * B * R * s * d_in].view(P * B, -1, d_in)
        rows = torch.bmm(grads.mT, inputs, out=out).view(P, B * R, -1)  # rows (i, r)
        G += blocks_gram(rows)
    return G
