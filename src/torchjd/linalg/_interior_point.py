r"""A batched primal-dual interior-point method for ``min_{v ≥ u} vᵀ G v``, for hard rows.

Principal pivoting can wander for a long time on degenerate problems (many more rows than the
rank of ``G``, where the optimal weights lie on a face of high dimension). The interior-point
method of Mehrotra (1992), in the form of Nocedal & Wright (2006, Algorithm 16.4) for
bound-constrained quadratic programs, converges on them in a few tens of steps, whatever the
degeneracy. With ``x = v − u ≥ 0`` and the multipliers ``z ≥ 0``, it follows the central path
of

.. math::

    2 G (u + x) - z = 0, \qquad x \odot z = \mu \mathbf 1, \qquad \mu \to 0 .

Each Newton step solves, for every row, ``(2G + X⁻¹Z) Δx = r`` by a batched Cholesky
factorisation after a symmetric Jacobi scaling (the diagonal ``z/x`` spans many orders of
magnitude near the solution). The predictor-corrector choice of the centring parameter and the
step back from the boundary (``0.99`` of the longest step) are Mehrotra's.

The returned ``v`` is interior (``v > u``) up to the last step; the caller identifies the active
set from it and finishes on the exact face.
"""

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from torchjd.linalg._kkt import row_scales
from torchjd.linalg._low_rank import cholesky_solve, woodbury_solvers
from torchjd.linalg._principal_pivoting import upper_cholesky

_STEP_BACK = 0.99
# Of each row's gradient scale, the multipliers' start (see interior_point).
_DUAL_START = 0.1


def interior_point(
    G: Tensor,
    U: Tensor,
    tol: float,
    max_iters: int = 100,
    low_rank: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Approximate rows ``argmin_{v ≥ u} vᵀ G v`` (``G`` positive definite), to a gradient
    residual and a complementarity below ``tol``, each entry ``j`` relative to its row's scale
    ``‖J_j‖ max_k ‖J_k‖ · max|u|`` (so that rows of small norm are as accurate as the others).

    It starts from ``x = max|u|`` and ``z_j = `` :data:`_DUAL_START` ``‖J_j‖ max_k ‖J_k‖ ·
    max|u|``, each multiplier at the scale of its own row's gradient: with row norms spread
    over decades, a start at the largest row's scale leaves the small rows' multipliers far too
    large, and the first steps go to bringing them down.

    With ``low_rank = (L, t)``, ``G ≈ L Lᵀ + diag(t)`` and the Newton systems are solved by the
    Woodbury identity (:mod:`torchjd.linalg._low_rank`)."""
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    row_scale = row_scales(G)
    P = 2 * G
    m = U.shape[1]
    x = torch.ones_like(U) * u_scale
    z = _DUAL_START * row_scale * u_scale
    dual_tol = tol * row_scale * u_scale  # of each entry of the gradient residual
    complementarity_tol = dual_tol * u_scale
    V = U.clone()
    rows = torch.arange(U.shape[0], device=U.device)
    # Solvers of each row's (P + diag(shift + z/x)) Δx = b.
    solvers = partial(_factorise, P) if low_rank is None else woodbury_solvers(low_rank[0])
    shift = 0.0 if low_rank is None else 2 * low_rank[1]
    for _ in range(max_iters):
        v = U + x
        r_d = torch.addmm(z, v, P, beta=-1)  # v P − z
        xz = x * z
        converged = ((r_d.abs() <= dual_tol) & (xz <= complementarity_tol)).all(dim=1)
        n_converged = int(converged.sum())  # (one host synchronisation a step)
        if n_converged > 0:  # converged rows leave the batch
            if n_converged == len(rows):
                V[rows] = v
                return V
            (done,) = converged.nonzero(as_tuple=True)
            V[rows[done]] = v[done]
            (keep,) = (~converged).nonzero(as_tuple=True)
            rows, U, x, z, r_d, xz, dual_tol, complementarity_tol = (
                t[keep] for t in (rows, U, x, z, r_d, xz, dual_tol, complementarity_tol)
            )
        factor = solvers(shift + z / x)
        # Predictor: the affine-scaling direction.
        dx_aff, dz_aff = _direction(factor, x, z, r_d, -xz)
        alpha_aff = -1 / _most_negative_ratio(x, z, dx_aff, dz_aff).clamp_max(-1.0)
        # Mehrotra's centring σ = (μ_aff / μ)³ and the target σμ (sums: m μ).
        xz_sum = xz.sum(dim=1, keepdim=True)
        xz_aff = torch.addcmul(x, alpha_aff, dx_aff) * torch.addcmul(z, alpha_aff, dz_aff)
        sigma = (xz_aff.sum(dim=1, keepdim=True) / xz_sum).clamp(0, 1) ** 3
        # Corrector: centring and the second-order term.
        r_c = torch.addcmul(sigma * (xz_sum / m) - xz, dx_aff, dz_aff, value=-1)
        dx, dz = _direction(factor, x, z, r_d, r_c)
        alpha = -_STEP_BACK / _most_negative_ratio(x, z, dx, dz).clamp_max(-_STEP_BACK)
        x = torch.addcmul(x, alpha, dx)
        z = torch.addcmul(z, alpha, dz)
    V[rows] = U + x
    return V


def _factorise(P: Tensor, d: Tensor) -> Callable[[Tensor], Tensor]:
    """Solver of each row's ``(P + diag(d)) x = b``, by a Cholesky factorisation after a Jacobi
    scaling ``s = diag(P + diag(d))^{-1/2}`` (the scaled system has a unit diagonal, set in
    place)."""
    s = (P.diagonal() + d).rsqrt()
    # One [k, m, m] product allocated, the other in place (at m = 256, 39 rows, a quarter of
    # the time of two allocated products, about a tenth of each step's factorisation).
    K = P * s.unsqueeze(2)
    K.mul_(s.unsqueeze(1)).diagonal(dim1=1, dim2=2).fill_(1.0)
    L = upper_cholesky(K)
    return lambda b: s * cholesky_solve(L, s * b)


def _direction(
    solve: Callable[[Tensor], Tensor], x: Tensor, z: Tensor, r_d: Tensor, r_c: Tensor
) -> tuple[Tensor, Tensor]:
    """Newton direction for ``P Δx − Δz = −r_d`` and ``Z Δx + X Δz = r_c``."""
    dx = solve(r_c / x - r_d)
    dz = torch.addcmul(r_c, z, dx, value=-1) / x
    return dx, dz


def _most_negative_ratio(x: Tensor, z: Tensor, dx: Tensor, dz: Tensor) -> Tensor:
    """``−1 / α`` for the largest ``α`` keeping ``x + α dx ≥ 0`` and ``z + α dz ≥ 0``
    (``x, z > 0``), per row: ``min_j (dx_j / x_j, dz_j / z_j)``, clamped by the caller at zero
    (no bound then) or below."""
    return torch.minimum((dx / x).amin(dim=1, keepdim=True), (dz / z).amin(dim=1, keepdim=True))
