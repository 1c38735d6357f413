r"""Single principal pivots on the whole tableau, for the smallest problems (``9 ≤ m ≤ 24``).

In the Jacobi-scaled variables of :mod:`torchjd.linalg._small_pivoting` (``z = S⁻¹ v``,
``Ĝ = S G S``, ``û = S⁻¹ u``), the KKT conditions of ``min_{z ≥ û} zᵀ Ĝ z`` are the linear
complementarity problem ``y = Ĝ x + q``, ``x = z − û ≥ 0``, ``y = Ĝ z ≥ 0``, ``xᵀ y = 0`` with
``q = Ĝ û``. For a guess of the free set ``F`` (where ``x`` is basic, ``y`` on the active set
``A``), the principal pivot transform of the tableau ``[M | q] = [Ĝ | Ĝ û]`` on ``F`` gives the
basic variables as functions of the others: at zero non-basic variables, their values are ``q'``
(``x_F`` and ``y_A``: the face solution and its multipliers), and the guess is right when
``q' ≥ 0``. The transform on ``F``:

.. math::

    M'_{FF} = \hat G_{FF}^{-1}, \quad M'_{FA} = -\hat G_{FF}^{-1} \hat G_{FA}, \quad
    M'_{AF} = \hat G_{AF} \hat G_{FF}^{-1}, \quad
    M'_{AA} = \hat G_{AA} - \hat G_{AF} \hat G_{FF}^{-1} \hat G_{FA},

and a single pivot on index ``j`` (``p = M_jj > 0``: ``Ĝ`` is positive definite) is a rank-one
update: ``M'_{il} = M_{il} − M_{ij} M_{jl} / p``, ``M'_{ij} = M_{ij} / p``, ``M'_{jl} = −M_{jl} /
p``, ``M'_{jj} = 1 / p``, that is ``M' = M − c (M_{j:} − e_j)ᵀ`` with ``c = (M_{:j} + e_j) / p``;
and ``q' = q − c q_j``.

From the transform on the free set of ``v = u`` (the indices where ``G u ≤ 0``: one batched
factorisation), each step pivots, in every row at once, on its most negative basic variable
(Bard's rule; Murty, *Linear Complementarity*, 1988, §2.6): a fixed dozen operations on the
``[k, m, m]`` tableau, against a few dozen for a block step, and as few steps on these sizes
(where ``k · m²`` is small). Bard's rule can cycle on rare matrices: the steps are bounded, and
the rows left unsolved say so. Every row is checked on ``G`` itself at the end.
"""

import torch
from torch import Tensor

from torchjd.linalg._small_pivoting import ScaledProblem

TABLEAU_MAX_M = 24  # beyond, the [k, m, m] tableau costs more than block steps


def tableau_pivoting(G: Tensor, U: Tensor, tol: float, max_steps: int) -> tuple[Tensor, Tensor]:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` of ``U`` (``[k, m]``), in float64 (see the module
    docstring), and which rows are solved: their KKT residual on ``G``
    (:func:`~torchjd.linalg._kkt.kkt_residual`) is at most ``tol``. Rows come back with ``v ≥ u``
    exactly. ``G`` must have a positive diagonal (else no row is solved)."""
    return scaled_tableau_pivoting(ScaledProblem(G, U, tol), max_steps)


def scaled_tableau_pivoting(problem: ScaledProblem, max_steps: int) -> tuple[Tensor, Tensor]:
    """:func:`tableau_pivoting` on a prepared problem."""
    G_hat, U_hat = problem.G_hat, problem.U_hat
    k, m = U_hat.shape
    q = U_hat @ G_hat
    # The transform on F = {q ≤ 0}, from the masked full-size system [Ĝ_FF, 0; 0, I].
    free = q <= 0
    mask = free.unsqueeze(2) & free.unsqueeze(1)
    eye = torch.eye(m, dtype=G_hat.dtype, device=G_hat.device)
    L, _ = torch.linalg.cholesky_ex(torch.where(mask, G_hat, eye))
    # (cholesky_solve: cholesky_inverse checks its input, a host synchronisation)
    P = torch.where(mask, torch.cholesky_solve(eye.expand(k, m, m), L), 0.0)  # Ĝ_FF⁻¹ on F
    # With T = Ĝ_FF⁻¹ Ĝ_F: (zero rows on A; T_FF = I), the four blocks of the transform are those
    # of P − T + Tᵀ + Ĝ − Ĝ T, and its values q − Ĝ y − y with y = Ĝ_FF⁻¹ q_F (zero on A).
    T = P @ G_hat
    M = P - T + T.mT + G_hat - G_hat @ T
    y = (P @ q.unsqueeze(2)).squeeze(2)
    q = torch.addmm(q - y, y, G_hat, alpha=-1)
    # Infeasible: x_j = z_j − û_j or y_j = (Ĝ z)_j below its bound (see ScaledProblem).
    primal_bound, dual_bound = -problem.primal_bound, problem.dual_bound
    batch = torch.arange(k, device=G_hat.device)
    positions = torch.arange(m, device=G_hat.device)
    for _ in range(max_steps):
        # Each row's most negative basic variable beyond its bound (Bard's rule), if any (a NaN
        # row pivots on nothing, and fails the final check).
        excess = q - torch.where(free, primal_bound, dual_bound)
        least, pivot = excess.min(dim=1, keepdim=True)
        pivoting = least < 0
        if not bool(pivoting.any()):
            break
        column, row = M[batch, :, pivot.squeeze(1)], M[batch, pivot.squeeze(1), :]
        e = (positions == pivot) & pivoting
        e_float = e.to(q.dtype)
        # M − c (M_{j:} − e_j)ᵀ with c = (M_{:j} + e_j) / p is the transform, M'_jj included;
        # c = 0 in the rows that do not pivot.
        c = (column + e_float) / torch.where(pivoting, column.gather(1, pivot), torch.inf)
        M = torch.addcmul(M, c.unsqueeze(2), (row - e_float).unsqueeze(1), value=-1)
        q = torch.addcmul(q, c, q.gather(1, pivot), value=-1)
        free = free ^ e
    return problem.solution(U_hat + torch.where(free, q, 0.0))
