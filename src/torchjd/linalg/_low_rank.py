r"""Newton systems of the interior-point method for a Gramian of low rank (Woodbury identity).

With ``m`` rows and rank ``r ≪ m`` (per-sample gradients of a small model, many more tasks than
parameters), the Tikhonov-regularised Gramian of the exact mode is

.. math::

    G_t = L L^\top + \operatorname{diag}(t), \qquad L = V_r \Lambda_r^{1/2} \ (m \times r)

with the ``r`` eigenpairs of ``G`` above a relative :data:`_RANK_TOL` (the others are far below
the Tikhonov term ``t``). Each interior-point step solves, for every row, ``(Δ + 2 L Lᵀ) Δx = b``
with a positive diagonal ``Δ = 2t + z/x``; by the Woodbury identity

.. math::

    (\Delta + 2 L L^\top)^{-1} b = \Delta^{-1} b - \Delta^{-1} L\, C^{-1} L^\top \Delta^{-1} b,
    \qquad C = \tfrac12 I + L^\top \Delta^{-1} L,

an ``r × r`` factorisation per row instead of ``m × m``: ``O(m r²)`` work instead of ``O(m³)``.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from torchjd.linalg._autograd import tracked

_RANK_TOL = {torch.float64: 1e-13, torch.float32: 1e-6}
_PRODUCTS_ENTRIES = 2**22  # of the products l_j l_jᵀ (32 MiB in float64)


def low_rank_factor(G: Tensor, max_rank: int, dtype: torch.dtype | None = None) -> Tensor | None:
    """``L`` with ``G ≈ L Lᵀ`` (the eigenpairs above :data:`_RANK_TOL` of the largest, for the
    rounding of a Gramian computed in ``dtype``, by default that of ``G``), or None when the rank
    exceeds ``max_rank``."""
    if tracked(G):
        eigenvalues, vectors = _TrackedEigh.apply(G)
    else:
        eigenvalues, vectors = torch.linalg.eigh(G)
    keep = eigenvalues > _RANK_TOL[dtype or G.dtype] * eigenvalues[-1]
    if int(keep.sum()) > max_rank:
        return None
    return vectors[:, keep] * eigenvalues[keep].sqrt()


class _TrackedEigh(torch.autograd.Function):
    """``torch.linalg.eigh`` of a symmetric matrix whose backward leaves out the pairs of equal
    eigenvalues (``1 / (λ_j − λ_i)`` with ``λ_i = λ_j``, which make torch's own backward NaN, as
    in the exact zeros of a Gramian with zero rows). That is the gradient of any function of the
    eigenpairs that depends on an eigenspace of equal eigenvalues only through the whole space
    (the factor of the range kept by :func:`low_rank_factor`, whose dropped eigenvectors it does
    not use)."""

    @staticmethod
    def forward(ctx, G: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        eigenvalues, vectors = torch.linalg.eigh(G)
        ctx.save_for_backward(eigenvalues, vectors)
        return eigenvalues, vectors

    @staticmethod
    def backward(ctx, grad_values: Tensor, grad_vectors: Tensor) -> Tensor:  # noqa: ANN001
        eigenvalues, vectors = ctx.saved_tensors
        inner = vectors.mT @ grad_vectors
        inner = (inner - inner.mT) / 2
        gaps = eigenvalues.unsqueeze(0) - eigenvalues.unsqueeze(1)  # λ_j − λ_i
        inner = torch.where(gaps != 0, inner / torch.where(gaps != 0, gaps, 1.0), 0.0)
        inner = inner + torch.diag(grad_values)
        return vectors @ inner @ vectors.mT


def woodbury_factor(
    G: Tensor, max_rank: int, dtype: torch.dtype, scaled: tuple[Tensor, Tensor] | None
) -> Tensor | None:
    """``L`` with ``G ≈ L Lᵀ`` for the interior point's Woodbury solves (``G`` in float64;
    ``dtype``: that of the Gramian whose values it holds), or None when its rank exceeds
    ``max_rank``. For a float32 Gramian with ``scaled`` (``(ℓ, √W)``, the factor of its
    Jacobi-scaled form, ``ℓ ℓᵀ ≈ W^{-1/2} G W^{-1/2}``, of
    :func:`~torchjd.linalg._spanning.range_factor`), ``L = √W ⊙ ℓ``: its rank is read at the
    rounding of float32 relative to each pair of rows' norms, where :func:`low_rank_factor` of
    ``G`` itself keeps, at the float64 threshold, eigenvalues of that rounding (on the hard
    Jacobian of seed 0, #1, of ``benchmarks/non_conflict.py`` at ``m = 1024``: rank 441 against
    351, and ``r²`` in the cost of each Newton step), and, at the float32 threshold, drops the
    rows of small norm. Otherwise :func:`low_rank_factor` of ``G`` (float64 threshold)."""
    if dtype == torch.float32 and scaled is not None:
        ell, sqrt_weights = scaled
        return None if ell.shape[1] > max_rank else sqrt_weights.unsqueeze(1) * ell
    return low_rank_factor(G, max_rank)


def woodbury_solvers(L: Tensor) -> Callable[[Tensor], Callable[[Tensor], Tensor]]:
    """``δ ↦`` solver of ``(diag(δ) + 2 L Lᵀ) x = b`` for each row's ``δ`` (``[k, m]``, positive).

    ``C`` is symmetric and its Cholesky factorisation reads one triangle: when the products
    ``l_j l_jᵀ`` of the rows of ``L`` (their upper triangles, ``m · r(r+1)/2`` entries) fit in
    :data:`_PRODUCTS_ENTRIES`, they are formed once, and the upper triangle of every row's
    ``Lᵀ Δ⁻¹ L`` comes from one matrix product ``[1/δ_j]_j [l_j l_jᵀ]_j`` (``[k, m]`` by
    ``[m, r(r+1)/2]``): half the multiplications of the batch ``(Δ^{-1/2} L)ᵀ (Δ^{-1/2} L)``, in
    one large product rather than ``k`` small ones (at ``m = 256``, ``r = 142``, ``k = 70``, a
    third less time per factorisation, one thread). Beyond that memory, the batch."""
    m, r = L.shape
    if m * r * (r + 1) // 2 > _PRODUCTS_ENTRIES:
        return lambda delta: _solver(L, 1 / delta, _batched_capacitance)
    upper = torch.triu_indices(r, r, device=L.device)
    products = pair_products(L)  # [m, r(r+1)/2]
    positions = upper[0] * r + upper[1]
    squares = L * L

    def capacitance(L: Tensor, inverse: Tensor) -> tuple[Tensor, Tensor]:
        entries = inverse @ products
        C = entries.new_zeros(entries.shape[0], r * r).index_copy_(1, positions, entries)
        s = (inverse @ squares + 0.5).rsqrt()
        C = C.view(-1, r, r) * s.unsqueeze(2) * s.unsqueeze(1)
        C.diagonal(dim1=1, dim2=2).fill_(1.0)
        return C, s

    return lambda delta: _solver(L, 1 / delta, capacitance)


def pair_products(L: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
    """``[L_{ja} L_{jb}]_{j, (a, b)}`` for ``start ≤ a < stop`` and ``a ≤ b``: those rows of the
    upper triangle of each ``l_j l_jᵀ`` in row-major order (the order of ``torch.triu_indices``;
    ``m × Σ_a (r − a)``; all of it by default), from which ``Σ_j w_j l_j l_jᵀ`` of any weights is
    one matrix product."""
    stop = L.shape[1] if stop is None else stop
    return torch.cat([L[:, a : a + 1] * L[:, a:] for a in range(start, stop)], dim=1)


def _batched_capacitance(L: Tensor, inverse: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's Jacobi-scaled ``C = ½ I + Lᵀ Δ⁻¹ L`` (unit diagonal) and its scaling ``s``."""
    X = L * inverse.sqrt().unsqueeze(2)  # Δ^{-1/2} L, [k, m, r]
    half = 0.5 * torch.eye(L.shape[1], dtype=L.dtype, device=L.device)
    C = torch.baddbmm(half, X.mT, X)
    s = C.diagonal(dim1=1, dim2=2).rsqrt()
    C = s.unsqueeze(2) * C * s.unsqueeze(1)
    C.diagonal(dim1=1, dim2=2).fill_(1.0)
    return C, s


def _solver(
    L: Tensor, inverse: Tensor, capacitance: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
) -> Callable[[Tensor], Tensor]:
    """The Woodbury solve, ``inverse = Δ⁻¹``, with ``C`` and ``s`` from ``capacitance`` (``C`` is
    read from its upper triangle)."""
    C, s = capacitance(L, inverse)
    factor = torch.linalg.cholesky_ex(C, upper=True)[0].mT

    def solve(b: Tensor) -> Tensor:
        y = inverse * b
        w = s * cholesky_solve(factor, s * (y @ L))
        return y - inverse * (w @ L.T)

    return solve


def cholesky_solve(L: Tensor, b: Tensor) -> Tensor:
    """Each row's ``(L Lᵀ)⁻¹ b`` (``L``: ``[k, n, n]`` lower-triangular, ``b``: ``[k, n]``), by two
    triangular solves: several times faster than ``torch.cholesky_solve`` on batches of single
    right-hand sides."""
    y = torch.linalg.solve_triangular(L, b.unsqueeze(2), upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(2)
