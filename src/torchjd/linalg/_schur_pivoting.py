r"""Face solves of block principal pivoting through ``G⁻¹``, for large well-conditioned problems.

On a face (active set ``A``, free set ``F``) of ``min_{v ≥ u} vᵀ G v``, the gradient
``λ = G v`` vanishes on ``F``, so ``v = G⁻¹ λ`` with ``λ`` supported on ``A``, and ``v_A = u_A``
gives the multipliers from the ``|A| × |A|`` Schur complement of ``H = G⁻¹``:

.. math::

    H_{AA}\, \lambda_A = u_A, \qquad v = H_{:A}\, \lambda_A, \qquad G v = \lambda .

(This is the dual problem :math:`\max_{\lambda \ge 0} \lambda^\top u - \tfrac14 \lambda^\top H
\lambda`, up to the factor 2, restricted to its support ``A``.) A step of pivoting then costs one
batched ``|A| × |A|`` factorisation and one ``[k, m] × [m, m]`` product: the gradient needs no
second product. Rows whose free set is the smaller solve the primal face ``G_FF v_F = −G_FA u_A``
instead (:func:`~torchjd.linalg._principal_pivoting.solve_on_faces`).

Gramians whose rows share a strong common direction are of this kind: each row of UPGrad has
a few free indices, and pivoting from the active set of ``G u`` needs two or three steps. So are
per-sample Gramians at initialisation (a tenth of the indices active, the samples of the row's
class): there, the rows of a class share their face, which is factorised once
(:func:`distinct_faces`). Elsewhere the ``k`` batched factorisations (``LAPACK`` calls, one per
face) cost more than ADMM's shared products, and the caller chooses ADMM by :func:`face_cost`.

:func:`schur_pivoting` runs the exchanges of
:func:`~torchjd.linalg._principal_pivoting.principal_pivoting` (Júdice & Pires, 1994) with these
face solves, on ``H`` after a symmetric Jacobi scaling (unit diagonal of ``G``), in the dtype of
``G`` when ``G`` is well enough conditioned for it (float32: half the cost of the products), and
checks its answer on ``G`` itself with one product.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from torchjd.linalg._kkt import feasible_kkt_residual, row_scales
from torchjd.linalg._low_rank import cholesky_solve
from torchjd.linalg._principal_pivoting import (
    _DUAL_THRESHOLD,
    _FULL_EXCHANGES,
    _INVERSE_MIN_PIVOT,
    _PRIMAL_THRESHOLD,
    exchange,
    scaled_inverse,
    solve_on_faces,
)

# The squared smallest pivot of the scaled Cholesky factor for which schur_pivoting works in the
# dtype of G: at κ ≲ 1 / pivot, the face solutions are then accurate to about κ ε, well within
# the default tolerance (2e-5 in float32). Below, it works in float64.
_MIN_PIVOT = {torch.float64: _INVERSE_MIN_PIVOT[torch.float64], torch.float32: 1e-2}
_DISTINCT_MIN_ROWS = 128  # from this many rows, distinct faces are factorised once
_DISTINCT_MAX_FRACTION = 4  # when there are at most a quarter as many distinct faces as rows
_GOLDEN = 0.6180339887498949
FaceSolver = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def face_cost(active: Tensor) -> Tensor:
    r"""``Σ_faces min(|A|, |F|)³`` over the distinct faces of the rows: the flops of one step of
    pivoting by :func:`schur_face_solver` (up to a constant), a 0-dimensional tensor."""
    return distinct_face_cost(distinct_faces(active)[0])


def distinct_face_cost(faces: Tensor) -> Tensor:
    """:func:`face_cost` of distinct ``faces`` (from :func:`distinct_faces`)."""
    n_active = faces.sum(dim=1)
    size = torch.minimum(n_active, faces.shape[1] - n_active).double()
    return size.pow(3).sum()


def schur_pivoting(
    G: Tensor,
    U: Tensor,
    active: Tensor,
    tol: float,
    max_steps: int,
    max_size: int,
    distinct: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor] | None:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` by block principal pivoting from the guess ``active``
    (``[k, m]``), every face solved through ``G⁻¹`` (see the module docstring), in the dtype of
    ``G``, or in float64 when ``G`` is too ill-conditioned for it; None when even float64 is not
    accurate enough.

    Returns the rows (``v ≥ u`` exactly) and which of them converged: those whose KKT residual on
    ``G`` is below ``tol``. Rows whose face outgrows ``max_size`` (see :func:`schur_face_solver`)
    stop, unconverged, and rows still infeasible after ``max_steps`` face solves stop too.
    ``distinct``: :func:`distinct_faces` of ``active``, when the caller has it."""
    inverse = scaled_inverse(G, _MIN_PIVOT[G.dtype])
    G_work, U_work = G, U
    if inverse is None and G.dtype != torch.float64:
        G_work, U_work = G.double(), U.double()
        inverse = scaled_inverse(G_work, _MIN_PIVOT[torch.float64])
    if inverse is None:
        return None
    solve = _InverseFaces(G_work, *inverse, max_size)
    X = _pivot(U_work, active, solve, row_scales(G_work), tol, max_steps, distinct)
    X = torch.maximum(X.to(G.dtype), U)
    # The face solutions came from G⁻¹: each row is checked on G itself.
    return X, feasible_kkt_residual(G, U, X, X @ G) <= tol


def _pivot(
    U: Tensor,
    active: Tensor,
    solve: "_InverseFaces",
    row_scale: Tensor,
    tol: float,
    max_steps: int,
    distinct: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """The exchanges of principal pivoting (its feasibility test and :func:`exchange`); returns
    the last face solution of every row. Rows leave the batch when they have no infeasible index
    left, or a NaN face solution (a face too big, or a failed factorisation)."""
    k, m = U.shape
    X = U
    rows = torch.arange(k, device=U.device)
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(U.dtype).tiny)
    dual_scale = -_DUAL_THRESHOLD * tol * row_scale  # times u_scale: the bound on G v
    best = torch.full((k,), m + 1, device=U.device)
    tries = torch.full((k,), _FULL_EXCHANGES, device=U.device)
    for step in range(max_steps):
        V, GV = solve(U, active, distinct if step == 0 else None)
        if step == 0:
            X = V
        else:
            X[rows] = V
        # No torch.where (slow on booleans).
        infeasible = ((dual_scale * u_scale > GV) & active) | (
            ((_PRIMAL_THRESHOLD * tol) * u_scale < U - V) & ~active
        )
        count = infeasible.sum(dim=1)
        left = (count > 0).nonzero().squeeze(1)
        if left.numel() == 0:
            break
        if left.numel() < len(rows):  # the rows done leave before the exchange
            rows, U, active, infeasible, count, best, tries, u_scale = (
                t[left] for t in (rows, U, active, infeasible, count, best, tries, u_scale)
            )
        active, best, tries = exchange(active, infeasible, count, best, tries)
    return X


def schur_face_solver(G: Tensor, max_size: int) -> FaceSolver | None:
    """The face solver ``(U, active) ↦ (V, G V)`` through ``G⁻¹`` (see the module docstring), or
    None when ``G`` is too ill-conditioned for ``G⁻¹`` to be accurate.

    Rows whose face costs more than a ``max_size × max_size`` system (``min(|A|, |F|) >
    max_size``) are not solved: NaN, which stops them, unconverged."""
    inverse = scaled_inverse(G, _INVERSE_MIN_PIVOT[G.dtype])
    return None if inverse is None else _InverseFaces(G, *inverse, max_size)


class _InverseFaces:
    """Face solves through ``H = (S G S)⁻¹`` (see :func:`schur_face_solver`).

    ``H`` is bordered by an identity (indices from ``m`` on, as many as the widest face solved
    through ``H``) that pads the active sets of different sizes: the padded ``|A| × |A|`` blocks
    are then block-diagonal with an identity, and their multipliers zero, with no masking."""

    def __init__(self, G: Tensor, s: Tensor, H: Tensor, max_size: int) -> None:
        m = G.shape[0]
        self.G, self.s, self.max_size = G, s, max_size
        self.max_width = min(max_size, m // 2)
        eye = torch.eye(self.max_width, dtype=H.dtype, device=H.device)
        self.H = torch.block_diag(H, eye)
        self.HS = H * s  # v = μ (H S)
        self.border = torch.arange(m, m + self.max_width, device=H.device)

    def __call__(
        self, U: Tensor, active: Tensor, distinct: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        m = active.shape[1]
        n_active = active.sum(dim=1)
        width = int(n_active.amax())
        if width <= self.max_width:
            return self._dual(U, active, distinct, width)
        fits = torch.minimum(n_active, m - n_active) <= self.max_size
        dual = fits & (2 * n_active <= m)
        V = torch.full_like(U, torch.nan)
        GV = torch.full_like(U, torch.nan)
        if bool(dual.any()):
            rows = dual.nonzero().squeeze(1)
            V[rows], GV[rows] = self._dual(U[rows], active[rows])
        primal = fits & ~dual
        if bool(primal.any()):
            rows = primal.nonzero().squeeze(1)
            V[rows] = solve_on_faces(self.G, U[rows], active[rows])
            GV[rows] = V[rows] @ self.G
        return V, GV

    def _dual(
        self,
        U: Tensor,
        active: Tensor,
        distinct: tuple[Tensor, Tensor] | None = None,
        width: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""``v = S H S λ`` and ``G v = λ`` with ``(S H S)_{AA} λ_A = u_A``: in the scaled
        multipliers ``μ = S λ``, ``H_AA μ_A = (u / s)_A``.

        From :data:`_DISTINCT_MIN_ROWS` rows on, rows that share their active set (per-sample
        problems of the samples of one class) share its ``H_AA``: when the distinct faces are
        few, each is inverted once, and the multipliers of every row against every face's inverse
        are one product, of which each row keeps its own face's."""
        k, m = U.shape
        if k < _DISTINCT_MIN_ROWS:
            faces, inverse = active, None
        else:
            faces, inverse = distinct_faces(active) if distinct is None else distinct
        if inverse is not None and _DISTINCT_MAX_FRACTION * len(faces) > k:
            faces, inverse = active, None
        if width is None:  # the largest active set (the same over distinct faces)
            width = int(faces.sum(dim=1).amax())
        if width == 0:
            return torch.zeros_like(U), torch.zeros_like(U)
        # Each face's active indices, padded with border indices.
        idx = torch.topk(faces.to(U.dtype), width, dim=1, sorted=False).indices
        idx = torch.where(faces.gather(1, idx), idx, self.border[:width])
        L, _ = torch.linalg.cholesky_ex(self.H[idx.unsqueeze(2), idx.unsqueeze(1)])
        if inverse is not None:
            idx = idx[inverse]
        b = torch.nn.functional.pad(U / self.s, (0, self.max_width)).gather(1, idx)
        if inverse is None:
            mu_A = cholesky_solve(L, b)
        else:
            inverses = torch.cholesky_inverse(L)  # symmetric: [f, i, j] = [f, j, i]
            every = b @ inverses.transpose(0, 1).reshape(width, -1)  # [k, faces · width]
            mu_A = every.view(k, -1, width)[torch.arange(k, device=U.device), inverse]
        mu = U.new_zeros(k, m + self.max_width).scatter_(1, idx, mu_A)[:, :m]
        # On the active set, v = u up to rounding (pivoting clamps v ≥ u at the end).
        return mu @ self.HS, mu / self.s


def distinct_faces(active: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct rows of ``active`` ``[k, m]`` and, for each row, the index of its own among
    them: ``faces[inverse] == active``.

    Rows are keyed by a weighted count of their active indices (weights from a Weyl sequence, one
    float64 product) and the keys deduplicated; a coincidence of keys between different rows is
    caught by comparing the rows themselves, and then every row keeps its own face."""
    k, m = active.shape
    codes = torch.arange(m, dtype=torch.float64, device=active.device)
    codes = codes.mul_(_GOLDEN).frac_().add_(1)
    # (Booleans through uint8: a faster conversion; index_select: a faster gather of rows.)
    keys = active.to(torch.uint8).to(torch.float64) @ codes
    keys, inverse = torch.unique(keys, return_inverse=True)
    rows = torch.arange(k, device=active.device)
    representative = torch.empty(keys.shape[0], dtype=torch.long, device=active.device)
    faces = active.index_select(0, representative.scatter_(0, inverse, rows))
    if keys.shape[0] == k or not torch.equal(faces.index_select(0, inverse), active):
        return active, rows
    return faces, inverse
