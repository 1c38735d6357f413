r"""Block principal pivoting for small problems (``m ≤ 64``), each face solved on its smaller side.

For ``min_{v ≥ u} vᵀ G v`` with ``G`` positive definite, a guess of the active set ``A`` (where
``v = u``; free set ``F``) fixes ``v`` in two equivalent ways. In the Jacobi-scaled variables
``z = S⁻¹ v``, ``Ĝ = S G S``, ``S = diag(G)^{-1/2}`` (unit diagonal), and ``H = Ĝ⁻¹``:

.. math::

    \text{primal: } \hat G_{FF}\, z_F = -\hat G_{FA}\, \hat u_A, \qquad
    \text{dual: } H_{AA}\, \mu_A = \hat u_A,\; z = H_{:A}\, \mu_A \;(\hat G z = \mu),

with :math:`\hat u = S^{-1} u`: the gradient :math:`\hat G z` vanishes on ``F``, so it is a
multiplier :math:`\mu` supported on ``A``. Each row solves the smaller of its two systems
(``|F| × |F|`` or ``|A| × |A|``): all rows at once, as one batched Cholesky factorisation of
blocks gathered from ``diag(H, Ĝ, I)`` (the identity pads the blocks to a common width). The
guess is right when ``z_F ≥ û_F`` and ``(Ĝ z)_A ≥ 0``; otherwise the infeasible indices change
side, all at once while their number falls, else (after three tries) only the largest: Júdice &
Pires (1994), the exchange of :func:`~torchjd.linalg._principal_pivoting.exchange`.

Rows whose guess is right keep their face, so the batch is never compacted: a step is a fixed
few dozen operations whatever the rows do, and the loop stops when every row is feasible. The
gradient ``Ĝ z`` is computed from ``z`` by one product (not taken from the multipliers), so the
feasibility test is on ``G`` itself; a face solution whose gradient does not vanish on its free
set (rounding on an ill-conditioned face) leaves its row unconverged.
"""

import torch
from torch import Tensor

from torchjd.linalg._principal_pivoting import _FULL_EXCHANGES, _PRIMAL_THRESHOLD

# Smallest pivot of the Cholesky factor of Ĝ (its square bounds the smallest eigenvalue) for which
# H = Ĝ⁻¹ is accurate enough in float64.
_MIN_PIVOT = 1e-3


def small_pivoting(
    G: Tensor, U: Tensor, active: Tensor, tol: float, max_steps: int
) -> tuple[Tensor, Tensor] | None:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` of ``U`` (``[k, m]``) from the guess ``active``, in
    float64 (see the module docstring), and which rows converged: no index infeasible by more than
    a small fraction of ``tol``, relative to ``max|u|`` (for ``v ≥ u``) or to
    :func:`~torchjd.linalg._kkt.row_scales` ``· max|u|`` (for ``G v ≥ 0``). Rows come back with
    ``v ≥ u`` exactly, in float64. None when ``G`` has a non-positive diagonal entry or is too
    ill-conditioned for ``H`` to be accurate (a pivot below :data:`_MIN_PIVOT`)."""
    k, m = U.shape
    G, U = G.double(), U.double()
    s = G.diagonal().rsqrt()
    G_hat = s.unsqueeze(1) * G * s
    L, info = torch.linalg.cholesky_ex(G_hat)
    # (a zero or negative diagonal entry gives an infinite or NaN s, hence a failed factorisation)
    if not bool(L.diagonal().amin() >= _MIN_PIVOT) or bool(info):
        return None
    H = torch.cholesky_inverse(L)
    # Face blocks are gathered (one take) from diag(H, Ĝ, I): dual rows from H, primal rows from
    # Ĝ, and the identity pads each block to the common width.
    blocks = torch.block_diag(H, G_hat, torch.eye(m, dtype=G.dtype, device=G.device))
    # Violations: u_j − v_j = s_j (û_j − z_j), and −(G v)_j / row_scale_j = −(Ĝ z)_j / √max G_ll
    # (row_scale_j = √(G_jj max G_ll)); both relative to max|u|.
    dual_weight = -G.diagonal().amax().rsqrt()
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
    U_hat, bound = U / s, (_PRIMAL_THRESHOLD * tol) * u_scale
    positions = torch.arange(m, 3 * m, device=G.device)  # padding: columns m, m + 1, ... of Z
    # Per row: the fewest infeasible indices so far, and the full exchanges left without progress.
    best = torch.full((k,), m + 1, device=G.device)
    tries = torch.full((k,), _FULL_EXCHANGES, device=G.device)
    Z_all = torch.empty_like(U)
    converged = torch.zeros(k, dtype=torch.bool, device=G.device)
    rows = torch.arange(k, device=G.device)
    for step in range(max_steps):
        n_active = active.sum(dim=1, keepdim=True)
        dual = 2 * n_active <= m  # the active side is the smaller: solve for the multipliers
        width = int(torch.minimum(n_active, m - n_active).amax())
        Z = torch.where(active, U_hat, 0.0)
        if width > 0:
            side = active == dual  # each row's indices on its smaller side
            index = torch.topk(side.to(G.dtype), width, dim=1, sorted=False).indices
            on_side = side.gather(1, index)
            padding = positions[:width]
            block = torch.where(on_side, index + torch.where(dual, 0, m), padding + m)
            factor, _ = torch.linalg.cholesky_ex(
                torch.take(blocks, block.unsqueeze(2) * (3 * m) + block.unsqueeze(1))
            )
            rhs = torch.where(dual, U_hat, (Z @ G_hat).neg_()).gather(1, index)
            x = torch.cholesky_solve((rhs * on_side).unsqueeze(2), factor).squeeze(2)
            solution = Z.new_zeros(len(rows), m + width)
            solution = solution.scatter_(1, torch.where(on_side, index, padding), x)[:, :m]
            Z = torch.where(active, U_hat, torch.where(dual, solution @ H, solution))
        conflict = (Z @ G_hat) * dual_weight
        violation = torch.where(active, conflict, (U_hat - Z) * s)
        infeasible = ~(violation <= bound)  # NaN counts as infeasible
        count = infeasible.sum(dim=1)
        # A face solution whose gradient does not vanish on its free set cannot be trusted (a
        # numerically singular face): its row stops, unconverged.
        exact = torch.where(active, 0.0, conflict).abs() <= tol * u_scale
        done = (count == 0) | ~exact.all(dim=1)
        n_done = int(done.sum())
        if n_done > 0 or step == max_steps - 1:  # the rows done leave with their last face
            Z_all[rows] = Z
            converged[rows] = count == 0
        if n_done == len(rows):
            break
        # The exchange of :func:`~torchjd.linalg._principal_pivoting.exchange`: all infeasible
        # indices while their count falls, else only the largest.
        tries = torch.where(count < best, _FULL_EXCHANGES, tries - 1)
        best = torch.minimum(count, best)
        flips = infeasible
        if bool((tries < 0).any()):
            largest = (infeasible * positions[:m]).amax(dim=1, keepdim=True)
            flips = infeasible & ((tries >= 0).unsqueeze(1) | (positions[:m] == largest))
        active = active ^ flips
        if n_done > 0:
            keep = (~done).nonzero().squeeze(1)
            rows, active, U_hat, u_scale = rows[keep], active[keep], U_hat[keep], u_scale[keep]
            bound, best, tries = bound[keep], best[keep], tries[keep]
    return torch.maximum(s * Z_all, U), converged
