r"""Gramians :math:`J J^\top` of per-objective gradients (one row per objective) by oneDNN's
matrix product, in float32 on the CPU.

On one thread of an AMD EPYC, the BLAS's float32 product (MKL's ``sgemm``) runs without the
processor's widest vector instructions, at about 100 GFLOP/s; oneDNN's linear layer
(:math:`x w^\top`, here with the same matrix as both) takes them, at up to 200 to 230 GFLOP/s
on large products: the Gramian of ``[32, 49152]`` (the per-objective gradients of a
Transformer's ``128 x 384`` map with 32 samples), 0.63 ms instead of 1.25 (160 GFLOP/s). Its
fixed costs are higher: small matrices stay with the BLAS (see ``MIN_ELEMENTS``). Never in
float64 nor on other devices (the BLAS's products there).

:func:`gram` and :func:`blocks_gram` choose (oneDNN, or ``A Aᵀ`` and ``Σ_a J_a J_aᵀ`` by torch);
:func:`onednn_gram` and :func:`onednn_blocks_gram` take oneDNN's product, for callers that
choose by :func:`onednn_gram_is_faster` themselves. The Gramians by oneDNN are formed whole (up
to ``WHOLE_MAX_ROWS`` rows) or by their lower triangle by blocks of rows, then mirrored: exactly
symmetric. :func:`onednn_add_self_gram`
accumulates in the form of ``_linear.add_self_gram`` (``_linear.complete_self_gram`` mirrors).
"""

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

MIN_ELEMENTS = 1 << 17
"""The fewest elements of a block of per-objective gradients (in float32, on the CPU) whose
Gramian oneDNN's matrix product takes: fewer, its fixed costs exceed what it saves (in the
training steps of ``benchmarks/autogram_step.py``, on one thread of an AMD EPYC, ``[64, 896]``
blocks of a convolution: 0.37 ms instead of 0.17; ``[64, 18432]``: 1.1 ms instead of 1.7 by
triangle; mlp64's ``[64, 512]`` and ``[64, 784]`` factors, with a bound of ``2^14``: its Gramian
phase 1.5 ms instead of 1.0; a Transformer's ``[32, 8192]`` blocks, 0.13 ms instead of 0.17)."""

TRIANGLE_ROWS = 32
"""The fewest rows of each block of rows of the lower triangle of :func:`onednn_blocks_gram`
beyond ``WHOLE_MAX_ROWS`` rows (a quarter of the rows from 128 rows on; on one thread of an AMD
EPYC, 256 rows of 4608 columns, by blocks of 64: 2.0 ms instead of 2.3 by 32)."""

WHOLE_MAX_ROWS = 64
"""The most rows whose Gramian :func:`onednn_blocks_gram` forms, and :func:`onednn_add_self_gram`
adds, by one product (all rows against all): on one thread of an AMD EPYC, 32 rows of 8192
columns, 0.10 ms instead of 0.12 by two blocks of rows; 64 rows of 4096, 0.17 ms instead of 0.21
by four; 128 rows of 8192, 1.1 ms instead of 0.94 by four. In the fused step of cnn64 in
``benchmarks/autogram_step.py``, the Gramian of its second convolution's per-objective
gradients (64 rows of 18432 columns, just formed: not in the nearest caches), 1.33 ms instead of
1.64 by two blocks of 32 rows (each block of rows reads the rows above it again)."""


@functools.cache
def onednn_linear() -> Callable[[Tensor, Tensor], Tensor] | None:
    """oneDNN's linear layer on dense float32 tensors (``x w^T``, without bias), where this build of
    torch has it and it gives the product (checked once, on a small product); else None."""
    linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if linear is None or not torch.backends.mkldnn.is_available():
        return None
    x, w = _probe_matrix(2, 3), _probe_matrix(4, 3)
    if not _gives(lambda: linear(x, w, None, "none", [], ""), x @ w.T):
        return None
    return lambda x, w: linear(x, w, None, "none", [], "")


def _probe_matrix(rows: int, columns: int) -> Tensor:
    """A small float32 matrix of distinct integers, on the CPU whatever the default device (the
    probes answer for the CPU's products)."""
    return (
        torch.arange(rows * columns, dtype=torch.float32, device="cpu").reshape(rows, columns) - 5
    )


def _gives(product: Callable[[], Tensor], expected: Tensor) -> bool:
    """Whether ``product()`` runs and gives exactly ``expected`` (a probe)."""
    try:
        with torch.no_grad():
            result = product()
            return isinstance(result, Tensor) and torch.equal(result, expected)
    except (RuntimeError, TypeError):
        return False


def _checked_linear() -> Callable[[Tensor, Tensor], Tensor]:
    linear = onednn_linear()
    if linear is None:
        raise RuntimeError("oneDNN's linear layer is not available in this build of torch.")
    return linear


def onednn_gram_is_faster(J: Tensor) -> bool:
    """Whether oneDNN's product takes the Gramian of ``J``, a matrix ``[n, *]`` or blocks
    ``[K, n, *]``: in float32 on the CPU with oneDNN, from ``MIN_ELEMENTS`` elements per block
    on."""
    block_elements = J.numel() if J.dim() == 2 else math.prod(J.shape[1:])
    return onednn_takes(J.dtype, J.device, block_elements)


def onednn_takes(dtype: torch.dtype, device: torch.device, block_elements: int) -> bool:
    """Whether oneDNN's product takes the Gramian of blocks of ``block_elements`` elements of
    ``dtype`` on ``device`` (see :func:`onednn_gram_is_faster`), without a tensor to ask."""
    return (
        block_elements >= MIN_ELEMENTS
        and _cpu_float32(dtype, device)
        and onednn_linear() is not None
    )


def _cpu_float32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether products of ``dtype`` on ``device`` may go to oneDNN: float32 on the CPU, with
    oneDNN available and enabled."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def gram(A: Tensor) -> Tensor:
    """``A Aᵀ`` of a matrix ``A`` ``[n, *]``: by oneDNN where :func:`onednn_gram_is_faster`, else
    by torch's product."""
    return onednn_gram(A) if onednn_gram_is_faster(A) else A @ A.T


def blocks_gram(J: Tensor) -> Tensor:
    """:math:`\\sum_a J_a J_a^\\top` of blocks ``J`` ``[K, n, *]``: by oneDNN where
    :func:`onednn_gram_is_faster`, else by torch's batched product."""
    return onednn_blocks_gram(J) if onednn_gram_is_faster(J) else (J @ J.mT).sum(dim=0)


def onednn_gram(A: Tensor) -> Tensor:
    """``A Aᵀ`` of a matrix ``A`` ``[n, *]`` by oneDNN's product (see
    :func:`onednn_blocks_gram`)."""
    return onednn_blocks_gram(A.unsqueeze(0))


def onednn_blocks_gram(J: Tensor) -> Tensor:
    r""":math:`\sum_a J_a J_a^\top` of blocks ``J`` ``[K, n, *]`` by oneDNN's matrix product (its
    linear layer :math:`x w^\top`, the blocks as both): up to ``WHOLE_MAX_ROWS`` rows, by one
    product per block; else its lower triangle by blocks of a quarter of the rows (at least
    ``TRIANGLE_ROWS``), each against itself and the rows above it; the upper triangle is the
    transpose of the lower one (exactly symmetric either way)."""
    linear = _checked_linear()
    J = J.flatten(2)
    n = J.shape[1]
    if J.shape[0] == 0:  # no blocks: the empty sum
        return J.new_zeros(n, n)
    if n <= WHOLE_MAX_ROWS:  # few small operations (each costs microseconds)
        G = linear(J[0], J[0])
        for block in J[1:]:
            G.add_(linear(block, block))
        return symmetric(G)

    def write(rows: Tensor, start: int, end: int) -> None:
        for a, block in enumerate(J):
            product = linear(block[start:end], block[:end])
            if a == 0:
                rows.copy_(product)
            else:
                rows.add_(product)

    return lower_triangle_gram(J, max(TRIANGLE_ROWS, -(-n // 4), 1), write)


def lower_triangle_gram(J: Tensor, step: int, write: Callable[[Tensor, int, int], None]) -> Tensor:
    r""":math:`\sum_a J_a J_a^\top` of blocks ``J`` ``[K, n, *]`` by its lower triangle, by blocks
    of ``step`` rows: ``write(rows, start, end)`` writes into ``rows`` (the rows ``start`` to
    ``end`` of the Gramian, up to column ``end``) the products of those rows of the blocks with
    their rows up to ``end``; the upper triangle is then the transpose of the lower one (see
    :func:`mirror_lower`)."""
    n = J.shape[1]
    G = J.new_empty(n, n)
    for start in range(0, n, step):
        end = min(start + step, n)
        write(G[start:end, :end], start, end)
    mirror_lower(G, step)
    return G


def onednn_add_self_gram(G: Tensor, A: Tensor, parts: list[tuple[int, int]]) -> None:
    """Adds ``A Aᵀ`` to ``G`` by oneDNN's product, where ``G``'s upper triangle by blocks of rows
    ``parts`` is what counts (as for ``_linear.add_self_gram``, which ``_linear.complete_self_gram``
    mirrors): up to ``WHOLE_MAX_ROWS`` rows, by one product of all rows (fewer calls), else each
    block of rows against the rows from the block on."""
    linear = _checked_linear()
    if A.shape[0] <= WHOLE_MAX_ROWS:
        G.add_(linear(A, A))
        return
    for start, stop in parts:
        G[start:stop, start:].add_(linear(A[start:stop], A[start:]))


def symmetric(G: Tensor) -> Tensor:
    """The symmetric matrix of ``G``'s lower triangle (exactly symmetric)."""
    return G.tril() + G.tril(-1).T


def mirror_lower(G: Tensor, step: int) -> None:
    """Makes ``G`` symmetric from its lower triangle by blocks of ``step`` rows (each block of
    rows written up to its diagonal block included), in place."""
    n = G.shape[0]
    for start in range(0, n, step):
        end = min(start + step, n)
        diagonal = G[start:end, start:end]
        diagonal.copy_(symmetric(diagonal))
        G[:start, start:end] = G[start:end, :start].T


PRODUCT_MIN_MULTIPLY_ADDS = 1 << 21
"""The fewest multiply-adds (``K M N``) of a product ``aᵀ b`` (``a`` ``[K, M]``, ``b``
``[K, N]``) that :func:`transposed_product` gives to oneDNN: on one thread of an AMD EPYC, from
``2^21`` on, 0.5 to 0.9 times the BLAS's time (mlp64's weighted gradients ``[512, 64] @
[64, 784]``: 0.28 ms instead of 0.54; ``[512, 64] @ [64, 512]``: 0.18 instead of 0.37; for
cnn64's ``[10, 64] @ [64, 4096]``, see ``PRODUCT_MIN_LEFT``); below, about as fast, or up to 2 to
4 times slower (mlp64's ``[10, 64] @ [64, 512]``: 0.024 ms instead of 0.012)."""

PRODUCT_MIN_OUTPUT = 1 << 13
"""The fewest elements (``M N``) of a product that :func:`transposed_product` gives to oneDNN:
with fewer outputs and many terms for each, the BLAS is as fast or faster (``[64, 512] @
[512, 64]``: 1.3 times the BLAS's time by oneDNN; ``[16, 1024] @ [1024, 128]``: 1.1 times)."""

PRODUCT_MIN_LEFT = 1 << 11
"""The fewest elements (``K M``) of the left factor ``a`` of a product that
:func:`transposed_product` gives to oneDNN, which reorders the right factor (``K N``) at each
call: for few output rows and terms, the reorder costs more than its product saves. In the fused
step of cnn64 in ``benchmarks/autogram_step.py``, its Linear layer's ``[10, 64] @ [64, 4096]``
(factors no longer in the nearest caches) by the BLAS, 0.30 ms instead of 0.47; on one thread of
an AMD EPYC, with factors out of the caches, ``[16, 64] @ [64, 4096]`` by the BLAS 0.30 ms
(oneDNN 0.43), and by oneDNN ``[32, 64] @ [64, 4096]`` 0.36 ms (the BLAS 0.42) and ``[10, 256]
@ [256, 4096]`` 0.66 ms (the BLAS 0.97)."""


@functools.cache
def onednn_transposed_linear() -> Callable[[Tensor, Tensor], Tensor] | None:
    """oneDNN's linear layer (see :func:`onednn_linear`) as the product ``aᵀ b`` of matrices
    ``a`` ``[K, M]`` and ``b`` ``[K, N]`` (row-major, so that oneDNN reads both transposed,
    without copies), where it gives that product on such views (checked once, on a small
    product); else None."""
    linear = onednn_linear()
    if linear is None:
        return None
    a, b = _probe_matrix(5, 3), _probe_matrix(5, 2)
    if not _gives(lambda: linear(a.T, b.T), a.T @ b):
        return None
    return lambda a, b: linear(a.T, b.T)


def product_takes(dtype: torch.dtype, device: torch.device, K: int, M: int, N: int) -> bool:
    """Whether :func:`transposed_product` gives a product of ``K`` terms per element, ``[M, N]``,
    to oneDNN: in float32 on the CPU with oneDNN, from ``PRODUCT_MIN_MULTIPLY_ADDS``
    multiply-adds, ``PRODUCT_MIN_OUTPUT`` elements and ``PRODUCT_MIN_LEFT`` elements of ``a``
    on."""
    return (
        K * M * N >= PRODUCT_MIN_MULTIPLY_ADDS
        and M * N >= PRODUCT_MIN_OUTPUT
        and K * M >= PRODUCT_MIN_LEFT
        and _cpu_float32(dtype, device)
        and onednn_transposed_linear() is not None
    )


def transposed_product(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` ``[M, N]`` of matrices ``a`` ``[K, M]`` and ``b`` ``[K, N]`` of one dtype and
    device (e.g. a Linear layer's weighted output gradients and its inputs, rows = positions:
    its weight's gradient): by oneDNN where :func:`product_takes`, else by torch's product (also
    where autograd would record it: oneDNN's linear layer has no derivative)."""
    (K, M), N = a.shape, b.shape[1]
    differentiated = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if not differentiated and product_takes(a.dtype, a.device, K, M, N):
        linear = onednn_transposed_linear()
        assert linear is not None  # product_takes checked it
        return linear(a.contiguous(), b.contiguous())  # (the layout that the probe checked)
    return a.T @ b
