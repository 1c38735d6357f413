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

Singular ``G`` (``least_norm=True``)
------------------------------------
When ``G`` is singular, the image ``Jᵀv`` of the solutions is unique but ``v`` is not. In this mode
every method runs on :func:`tikhonov` ``(G) = G + σ diag(G)`` with a tiny ``σ``, whose optimum
tends, as ``σ → 0``, to the optimal weights of least ``Σ_j G_jj v_j²`` (the least-norm weights of
the unit-norm rows); face solutions are then refined towards the exact ``G`` (iterated Tikhonov
regularisation). Up to ``m = 64``, pivoting gets a few steps from the one-step guess; up to
``m = 512``, from the active set of ADMM on the well-conditioned Gramian of the default mode
(:mod:`torchjd.linalg._warm_start`). Rows it has not solved by then (it can wander on degenerate
problems) go to a batched interior-point method (:mod:`torchjd.linalg._interior_point`), in
float64, whose Newton systems are solved by the Woodbury identity when ``rank(G) ≤ m / 2``
(:mod:`torchjd.linalg._low_rank`); pivoting then finishes the rows it leaves short of the
tolerance. Beyond ``m = 512``, ADMM runs on the Tikhonov Gramian first and pivoting takes over the
rows it leaves (slow: up to minutes at ``m = 1024``). The default tolerance is then ``1e-9`` in
float64.
"""

import torch
from torch import Tensor

from torchjd.linalg._admm import admm
from torchjd.linalg._interior_point import interior_point
from torchjd.linalg._kkt import kkt_residual, row_scales
from torchjd.linalg._low_rank import low_rank_factor
from torchjd.linalg._principal_pivoting import principal_pivoting
from torchjd.linalg._warm_start import warm_started_pivoting

DEFAULT_TOL = {torch.float64: 1e-7, torch.float32: 2e-5}
LEAST_NORM_TOL = {torch.float64: 1e-9, torch.float32: 2e-5}
# Relative Tikhonov term of the least-norm mode: above the rounding of a Gramian computed in the
# dtype, far below the tolerance on conflicts.
TIKHONOV = {torch.float64: 1e-8, torch.float32: 1e-5}
_DIRECT_MAX_M = 64  # up to this size, pivoting alone is exact and the fastest
_POLISH_BUDGET = 8  # polish when Σ_k |F_k|³ costs at most this many [m, m] × [m, m] products
_POLISH_STEPS = 4
_LEAST_NORM_ADMM_ITERS = 2_000  # then pivoting takes over the rows left
_LEAST_NORM_PIVOTS = 15  # degenerate rows that pivoting has not solved by then go to interior point
# Beyond, the warm-started pivoting of the least-norm mode can cycle between large faces, each
# step an O(m³) factorisation per row; ADMM on the Tikhonov Gramian then runs first instead.
_WARM_START_MAX_M = 512
_LOW_RANK_FRACTION = 2  # Woodbury solves in the interior point when rank(G) ≤ m / 2
_CHUNK_ENTRIES = 2**25  # of the interior point's [k, m, m] or [k, r, m] tensors (256 MiB)


def solve_lower_bounded_qp(
    G: Tensor,
    U: Tensor,
    *,
    tol: float | None = None,
    max_iters: int = 10_000,
    least_norm: bool = False,
) -> Tensor:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` for each row ``u`` of ``U`` (see the module docstring).

    With ``least_norm``, ``G`` may be singular: each row is then the optimum of
    :func:`tikhonov` (``G``), which tends to the optimal weights of least scaled norm, with a
    tighter default tolerance.
    """
    out_dtype = U.dtype
    work_dtype = G.dtype if G.dtype in DEFAULT_TOL else torch.float32
    G = G.to(work_dtype)
    U = U.to(work_dtype)
    if tol is None:
        tol = (LEAST_NORM_TOL if least_norm else DEFAULT_TOL)[work_dtype]

    G = (G + G.T) / 2
    G_exact = G if least_norm else None
    if least_norm:
        G = tikhonov(G)
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
            G64,
            U.double(),
            GU[rows] > 0,
            row_scales(G64),
            tol,
            _LEAST_NORM_PIVOTS if least_norm else 3 * m + 10,
            None if G_exact is None else G_exact.double(),
        )
        X = X.to(work_dtype)
        if not converged.all():
            left = (~converged).nonzero().squeeze(1)
            if least_norm:
                X[left] = _least_norm_fallback(G, G_exact, U[left], tol)
            else:
                X[left] = _admm_then_polish(G, U[left], tol, max_iters, G_exact)
    elif least_norm and m <= _WARM_START_MAX_M:
        X, converged = warm_started_pivoting(G, G_exact, U, tol, max_iters)
        if not converged.all():
            left = (~converged).nonzero().squeeze(1)
            X[left] = _least_norm_fallback(G, G_exact, U[left], tol)
    else:
        X = _admm_then_polish(G, U, tol, max_iters, G_exact)
    V[rows] = torch.maximum(X, U)
    return V.to(out_dtype)


def tikhonov(G: Tensor) -> Tensor:
    r"""``G + σ diag(G)`` (``σ`` from :data:`TIKHONOV`), with ``σ · 10⁻⁶ max_j G_jj`` on the
    diagonal of zero rows: positive definite, and, as ``σ → 0``, its optimum tends to the optimal
    weights of ``G`` that minimise :math:`\sum_j G_{jj} v_j^2 = \sum_j \|v_j J_j\|^2` (the
    energy of each row's contribution to the update), ties on zero rows broken by least norm."""
    diagonal = G.diagonal()
    weights = torch.where(diagonal > 0, diagonal, 1e-6 * diagonal.amax())
    return G + torch.diag(TIKHONOV[G.dtype] * weights)


def _least_norm_fallback(G: Tensor, G_exact: Tensor, U: Tensor, tol: float) -> Tensor:
    """The rows that pivoting left, in the least-norm mode: the interior point in float64, with
    Woodbury solves when ``rank(G_exact) ≤ m / 2``."""
    m = G.shape[0]
    G64, G_exact64 = G.double(), G_exact.double()
    L = low_rank_factor(G_exact64, m // _LOW_RANK_FRACTION)
    low_rank = None if L is None else (L, (G64 - G_exact64).diagonal())
    return _interior_point_then_polish(G64, U.double(), tol, G_exact64, low_rank).to(U.dtype)


def _admm_then_polish(
    G: Tensor, U: Tensor, tol: float, max_iters: int, G_exact: Tensor | None
) -> Tensor:
    """ADMM, then an exact polish by pivoting from the active set it found.

    The polish runs on every row when its face solves are cheap. With ``least_norm`` (a barely
    regularised ``G``, on which ADMM can be slow), ADMM stops after ``_LEAST_NORM_ADMM_ITERS``
    iterations and pivoting, whatever its cost, takes over the rows it left.
    """
    m = G.shape[0]
    least_norm = G_exact is not None
    if least_norm:
        max_iters = min(max_iters, _LEAST_NORM_ADMM_ITERS)
    Z, converged = admm(G, U, tol, max_iters)
    active = Z <= U
    free_sizes = (m - active.sum(dim=1)).double()
    cheap = float(free_sizes.pow(3).sum()) <= _POLISH_BUDGET * m**3
    if cheap:
        polish = torch.ones_like(converged)
    elif least_norm:
        polish = ~converged
    else:
        return Z
    rows = polish.nonzero().squeeze(1)
    if rows.numel() == 0:
        return Z
    steps = _POLISH_STEPS if bool(converged[rows].all()) else 3 * m + 10
    X, solved = principal_pivoting(G, U[rows], active[rows], row_scales(G), tol, steps, G_exact)
    Z[rows] = torch.where(solved.unsqueeze(1), X, Z[rows])
    return Z


def _interior_point_then_polish(
    G: Tensor,
    U: Tensor,
    tol: float,
    G_exact: Tensor,
    low_rank: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """For rows where pivoting wandered: the interior-point method, then, on the rows where it
    does not meet ``tol`` for ``G_exact``, pivoting (with the least-norm refinement) from the active
    set it identifies; its answer is kept where pivoting does not conclude. With ``low_rank``,
    ``(L, t)`` with ``G ≈ L Lᵀ + diag(t)``, its Newton systems are solved by the Woodbury identity.
    The rows go through it in chunks that bound its ``[k, m, m]`` (or ``[k, r, m]``) tensors."""
    m = G.shape[0]
    width = m if low_rank is None else low_rank[0].shape[1]
    chunk = max(1, _CHUNK_ENTRIES // (m * width))
    V = torch.cat(
        [interior_point(G, rows, 1e-3 * tol, low_rank=low_rank) for rows in U.split(chunk)]
    )
    rows = ~(kkt_residual(G_exact, U, V, V @ G_exact) <= tol)
    if not rows.any():
        return V
    U_left, V_left = U[rows], V[rows]
    active = V_left - U_left <= 1e-6 * U_left.abs().amax(dim=1, keepdim=True)
    X, solved = principal_pivoting(G, U_left, active, row_scales(G), tol, 20, G_exact)
    V[rows] = torch.where(solved.unsqueeze(1), X, V_left)
    return V
