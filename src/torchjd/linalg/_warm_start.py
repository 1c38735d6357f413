r"""Exact mode beyond ``m = 64``: principal pivoting warm-started by ADMM on a regularised Gramian.

In the least-norm (exact) mode, the solver works on :func:`~torchjd.linalg._bounded_qp.tikhonov`
``(G) = G + σ diag(G)`` with a tiny ``σ``: ADMM converges slowly on it (its condition number is
about ``1/σ`` on the null space of ``G``). The active set of the solution barely depends on the
regularisation, though, so it is first guessed by a few hundred ADMM iterations on the well
conditioned

.. math::

    G_\epsilon = G + \epsilon \operatorname{tr}(G)\, I, \qquad \epsilon = 10^{-4},

(the Gramian of the default mode), to a loose tolerance. Principal pivoting on the Tikhonov
Gramian, with its iterated refinement towards the exact ``G``, then corrects the few indices where
the guess is wrong, in a few exchanges. Rows it does not solve in :data:`_PIVOTS` exchanges are
returned unconverged, for the caller's slower fallback, and so are, in float64, those whose KKT
residual on ``G`` itself misses the tolerance.

From :data:`_FLOAT32_MIN_M` rows on, the guess is computed in float32 (half the cost of each
``[k, m] × [m, m]`` product), with a much smaller ``ε`` (:data:`_LARGE_REGULARISATION`) and a
tighter tolerance, for at most :data:`_LARGE_ITERS` iterations: there, each exchange of
pivoting costs a factorisation of ``|F| × |F|`` faces for every row, and the better guess saves
most of them (at ``m = 512``, from 10 to 2 exchanges; some Gramians of rank ``m / 2`` went from
minutes in the interior-point fallback to seconds). ADMM's penalty keeps its linear step
well-conditioned in float32 whatever ``ε``. The rows are pivoted in chunks of at most
:data:`_CHUNK_ENTRIES` ``/ m²`` rows, which bounds the memory of their face factorisations
(``k |F|²`` entries, about ``m³ / 4`` at ``m = 1024``) and keeps them in faster memory.
"""

import torch
from torch import Tensor

from torchjd.linalg._admm import admm
from torchjd.linalg._kkt import kkt_residual, row_scales
from torchjd.linalg._principal_pivoting import principal_pivoting

_REGULARISATION = 1e-4  # ε, relative to the trace: the default mode's
_TOL = 1e-4  # KKT residual at which ADMM's active set is trusted as a guess
_PIVOTS = 25
_FLOAT32_MIN_M = 512
_LARGE_REGULARISATION = 1e-6
_LARGE_TOL = 1e-5
_LARGE_ITERS = 500
_CHUNK_ENTRIES = 2**26
_WIDE = 1.2


def warm_started_pivoting(
    G: Tensor, G_exact: Tensor, U: Tensor, tol: float, max_iters: int
) -> tuple[Tensor, Tensor]:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` (``G``: the Tikhonov-regularised ``G_exact``, refined
    towards it), and which rows converged."""
    m = G.shape[0]
    eye = torch.eye(m, dtype=G.dtype, device=G.device)
    if m >= _FLOAT32_MIN_M:
        dtype, epsilon, guess_tol = torch.float32, _LARGE_REGULARISATION, _LARGE_TOL
        max_iters = min(max_iters, _LARGE_ITERS)
    else:
        dtype, epsilon, guess_tol = G.dtype, _REGULARISATION, _TOL
    G_regularised = G_exact + epsilon * G_exact.diagonal().sum() * eye
    bounds = U.to(dtype)
    Z, _ = admm(G_regularised.to(dtype), bounds, max(tol, guess_tol), max_iters)
    active = bounds >= Z  # at their lower bound
    scales = row_scales(G)
    X = torch.empty_like(U)
    converged = torch.zeros(U.shape[0], dtype=torch.bool, device=U.device)
    for rows in _batches(active):
        for chunk in rows.split(max(1, _CHUNK_ENTRIES // m**2)):
            X[chunk], converged[chunk] = principal_pivoting(
                G, U[chunk], active[chunk], scales, tol, _PIVOTS, G_exact
            )
    X = torch.maximum(X, U)
    # Pivoting converges on the Tikhonov Gramian; its refinement towards G_exact can fall short
    # (opposite rows): in float64, such rows are left to the fallback too. (In float32, the
    # rounding of G is of the order of the Tikhonov term: the check would only cost time.)
    if G.dtype == torch.float64:
        converged &= kkt_residual(G_exact, U, X, X @ G_exact) <= tol
    return X, converged


def _batches(active: Tensor) -> list[Tensor]:
    """The rows, split in two batches when some guessed faces are much wider than the others: the
    compacted face systems of a batch are padded to the widest of their size class."""
    sizes = (~active).sum(dim=1)
    wide = sizes > _WIDE * sizes.double().median()
    n_wide = int(wide.sum())
    if n_wide == 0 or n_wide == sizes.numel():
        return [torch.arange(sizes.numel(), device=active.device)]
    return [(~wide).nonzero().squeeze(1), wide.nonzero().squeeze(1)]
