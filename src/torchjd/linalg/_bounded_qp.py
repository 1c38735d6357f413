r"""Batched solver of the lower-bounded quadratic programs behind the dual-cone projection.

For each row :math:`u` of ``U`` (shape ``[k, m]``) and one shared positive semi-definite ``G``
(shape ``[m, m]``), the solver returns

.. math::

    v^\star(u) = \operatorname*{argmin}_{v \ge u} \; v^\top G v .

With ``G = J Jᵀ``, :math:`J^\top v^\star` is the projection of :math:`J^\top u` onto the dual cone
``{d : J d ≥ 0}`` of the rows of ``J`` (Quinton & Rey, 2024, Proposition 1). The KKT conditions
are: ``v ≥ u``, ``G v ≥ 0`` and ``(G v) ⊙ (v − u) = 0``.

Method
------
1. ``v = u`` is optimal exactly when ``G u ≥ 0`` (no row of ``J`` conflicts with ``Jᵀ u``): one
   shared matrix product finds these rows, which are returned unchanged.
2. Small problems (``m ≤ 64``) are solved exactly, in float64, by block principal pivoting
   (:mod:`torchjd.linalg._principal_pivoting`), starting from the active set of one primal-dual
   step from ``v = u``.
3. Larger problems, and rows where pivoting fails (a singular face), are solved by ADMM with one
   factorisation shared by all rows (:mod:`torchjd.linalg._admm`). The active set that ADMM finds is
   then polished by principal pivoting, when its free blocks are small enough to be cheap: the
   answer is then exact, as it is in the common case of few conflicts.

The returned ``v`` is always feasible (``v ≥ u`` exactly) and its KKT residual
(:func:`~torchjd.linalg._kkt.kkt_residual`) is below ``tol``: by default ``1e-7`` in float64 and
``2e-5`` in float32. Half-precision inputs are solved in float32. Non-finite entries in ``G`` or
``U`` give NaN rows; they never make the solver loop.
"""

import torch
from torch import Tensor

from torchjd.linalg._admm import admm
from torchjd.linalg._kkt import kkt_residual, row_scales
from torchjd.linalg._principal_pivoting import principal_pivoting

DEFAULT_TOL = {torch.float64: 1e-7, torch.float32: 2e-5}
_DIRECT_MAX_M = 64  # up to this size, pivoting alone is exact and the fastest
_PIVOTING_THRESHOLD = 1e-3  # of tol: violations that pivoting still corrects
_POLISH_BUDGET = 8  # polish when Σ_k |F_k|³ costs at most this many [m, m] × [m, m] products
_POLISH_STEPS = 4


def solve_lower_bounded_qp(
    G: Tensor, U: Tensor, *, tol: float | None = None, max_iters: int = 10_000
) -> Tensor:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` for each row ``u`` of ``U`` (see the module docstring)."""
    out_dtype = U.dtype
    work_dtype = G.dtype if G.dtype in DEFAULT_TOL else torch.float32
    G = G.to(work_dtype)
    U = U.to(work_dtype)
    if tol is None:
        tol = DEFAULT_TOL[work_dtype]

    G = (G + G.T) / 2
    m = G.shape[0]
    V = U.clone()
    GU = U @ G
    non_finite = kkt_residual(G, U, U, GU).isnan()
    V[non_finite] = torch.nan
    rows = ((GU < 0).any(dim=1) & ~non_finite).nonzero().squeeze(1)
    if rows.numel() == 0:
        return V.to(out_dtype)

    U = U[rows]
    if m <= _DIRECT_MAX_M:
        G64 = G.double()
        X, converged = principal_pivoting(
            G64, U.double(), GU[rows] > 0, row_scales(G64), _PIVOTING_THRESHOLD * tol, 3 * m + 10
        )
        X = X.to(work_dtype)
        if not converged.all():
            left = (~converged).nonzero().squeeze(1)
            X[left] = _admm_then_polish(G, U[left], tol, max_iters)
    else:
        X = _admm_then_polish(G, U, tol, max_iters)
    V[rows] = X
    return V.to(out_dtype)


def _admm_then_polish(G: Tensor, U: Tensor, tol: float, max_iters: int) -> Tensor:
    Z = admm(G, U, tol, max_iters)
    active = Z <= U
    m = G.shape[0]
    free_sizes = (m - active.sum(dim=1)).double()
    if float(free_sizes.pow(3).sum()) > _POLISH_BUDGET * m**3:
        return Z
    X, converged = principal_pivoting(G, U, active, row_scales(G), 0.1 * tol, _POLISH_STEPS)
    return torch.where(converged.unsqueeze(1), X, Z)
