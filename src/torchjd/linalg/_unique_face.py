r"""Exact mode on a singular ``G`` whose rows' optima are nevertheless unique.

When ``G = J Jᵀ`` has a large null space (many more rows than columns) but the rows of ``J``
do not positively span a subspace, each row's update ``d = Jᵀv`` is unique and so, in general,
is ``v`` itself: the optimal weights are the ``v ≥ u`` with ``Jᵀv = d`` and ``v_j = u_j``
wherever ``J_j · d > 0``; when that holds for every index at its bound (strict complementarity)
and the free rows ``J_P`` (``P = {j : v_j > u_j}``) are linearly independent, i.e. ``G_PP`` is
nonsingular, any other optimum ``v'`` has ``G_PP (v' − v)_P = 0``, so ``v' = v``. The
least-norm requirement of the exact mode is then void, and the Tikhonov regularisation of the
general route (whose faces, solved through the interior point, cost minutes at ``m = 1024``) is
not needed: ADMM on ``G`` itself (its linear step ``2G + ρI`` is nonsingular whatever ``G``) to
a loose tolerance gives the active set, and principal pivoting on ``G``'s faces, which are
nonsingular near the optimum, finishes it in a step or two.

:func:`unique_optimum_rows` returns the rows it can certify: pivoting converged, the KKT
residual on ``G`` meets the tolerance, every index at its bound has ``(Gv)_j`` at least
:data:`_STRICT` ``· s_j max|u|`` (``s_j = ‖J_j‖ max_l ‖J_l‖``, the scale of
:func:`~torchjd.linalg._kkt.kkt_residual`), and the Jacobi-scaled ``G_PP`` has every squared
Cholesky pivot at least :data:`_MIN_PIVOT` (the test of a nonsingular ``G`` in the exact mode,
restricted to the face). The others (several optima, as near-duplicate rows give, or a wrong
face) are left to the general route. When there are more than ``2 ·`` :data:`_PROBE_ROWS` rows,
a probe of :data:`_PROBE_ROWS` of them, spread out, goes first, and the others only when some
probe row is certified: near-duplicate rows usually leave no row unique (on the hard Jacobians of
``benchmarks/non_conflict.py`` at ``m = 256``, either none or about half of the rows are), and
the route then costs a tenth of its time.
"""

import torch
from torch import Tensor

from torchjd.linalg._admm import warm_admm
from torchjd.linalg._kkt import kkt_residual, row_scales
from torchjd.linalg._principal_pivoting import (
    bordered_scaled,
    compacted_blocks,
    principal_pivoting,
)
from torchjd.linalg._probe import probe_first

_GUESS_TOL = 1e-5  # KKT residual at which ADMM's (float32) active set is trusted as a guess
_GUESS_ITERS = 400
_PIVOTS = 3
_STRICT = 1e-6
_MIN_PIVOT = 1e-6
_CHUNK_ENTRIES = 2**24  # of the [k, |P|, |P|] face factorisations of the certificate (128 MiB)
_PROBE_ROWS = 16


def unique_optimum_rows(G: Tensor, U: Tensor, tol: float, rank: int) -> tuple[Tensor, Tensor]:
    """:func:`certified_rows` of every row, after a probe: when there are more than twice
    :data:`_PROBE_ROWS` rows, that many of them, spread out, go first, and the others only when
    some probe row is certified (near-duplicate rows usually make every optimum several, and
    this route's ADMM and pivoting are then spent for nothing)."""
    k = U.shape[0]
    if k <= 2 * _PROBE_ROWS:
        return certified_rows(G, U, tol, rank)

    def certify(rows: Tensor) -> tuple[Tensor, Tensor]:
        return certified_rows(G, rows, tol, rank)

    return probe_first(U, _PROBE_ROWS, certify, certify)


def certified_rows(G: Tensor, U: Tensor, tol: float, rank: int) -> tuple[Tensor, Tensor]:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` (``G`` and ``U`` in float64, ``G`` singular of rank
    ``rank``) and which of them are certified unique optima (see the module docstring); the
    others are ``u`` or an approximation.

    ADMM's guess runs in float32 (half the cost of its products; its tolerance is far above the
    rounding of ``G`` there), on the Jacobi-scaled problem (row norms spread over decades). A row
    whose guessed face has more free indices than ``rank`` cannot be a unique optimum (``G_PP``
    is singular: rows that positively span part of the space) and is not pivoted."""
    diagonal = G.diagonal()
    scale = torch.where(diagonal > 0, diagonal, 1.0).rsqrt().float()
    Z, _, _ = warm_admm(G.float(), U.float(), _GUESS_TOL, _GUESS_ITERS, scale=scale)
    guess = Z.double() <= U
    X = U.clone()
    certified = torch.zeros(U.shape[0], dtype=torch.bool, device=U.device)
    rows = ((~guess).sum(dim=1) <= rank).nonzero().squeeze(1)
    if rows.numel() == 0:
        return X, certified
    U_rows = U[rows]
    X_rows, converged = principal_pivoting(G, U_rows, guess[rows], row_scales(G), tol, _PIVOTS)
    # Singular faces (a wrong guess) can give NaN rows.
    X_rows = torch.where(X_rows.isfinite(), torch.maximum(X_rows, U_rows), U_rows)
    GX = X_rows @ G
    converged &= kkt_residual(G, U_rows, X_rows, GX) <= tol
    X[rows] = X_rows
    done = converged.nonzero().squeeze(1)
    if done.numel() > 0:
        converged[done] = unique_optimum(G, U_rows[done], X_rows[done], GX[done])
    certified[rows] = converged
    return X, certified


def unique_optimum(G: Tensor, U: Tensor, V: Tensor, GV: Tensor) -> Tensor:
    """Whether each optimal row ``v`` of ``V`` is the only optimum: strict complementarity on the
    indices at their bound, and ``G_PP`` nonsingular on the free indices ``P``."""
    m = G.shape[0]
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
    free = V > U
    strict = (free | (_STRICT * row_scales(G) * u_scale <= GV)).all(dim=1)
    # diag(S G S, I): unit diagonal, a zero one on zero rows (never free)
    _, bordered = bordered_scaled(G)
    width = max(1, int(free.sum(dim=1).amax()))
    # Each row's free indices first (a stable sort), padded by indices of the identity block.
    index = torch.argsort(free.to(torch.uint8), dim=1, descending=True, stable=True)[:, :width]
    padding = torch.arange(m, m + width, device=G.device)
    index = torch.where(free.gather(1, index), index, padding)
    nonsingular = []
    for rows in index.split(max(1, _CHUNK_ENTRIES // width**2)):
        L, info = torch.linalg.cholesky_ex(compacted_blocks(bordered, rows))
        pivots = L.diagonal(dim1=1, dim2=2) ** 2
        nonsingular.append((info == 0) & (pivots.amin(dim=1) >= _MIN_PIVOT))
    return strict & torch.cat(nonsingular)
