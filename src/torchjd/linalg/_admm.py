r"""ADMM for ``min_{v ≥ u} vᵀ G v``, all rows at once with one shared factorisation.

Splitting ``v = z``, ``z ≥ u`` (Boyd et al., 2011, §5.2, with the over-relaxation of §3.4.3), in
scaled form:

.. math::

    v &= (z - y)\, M, \qquad M = \rho\, (2G + \rho I)^{-1} \\
    \hat v &= \alpha v + (1 - \alpha) z \\
    z &= \max(u, \hat v + y) \\
    y &= y + \hat v - z

The linear step is the same for every row, so an iteration is one ``[k, m] × [m, m]`` product.
``ρ`` is adapted to balance the primal and dual residuals (Stellato et al., 2020, OSQP, §5.2),
within the range where ``2G + ρI`` can be inverted accurately in the working dtype. Every few
iterations the exact KKT residual of each row is measured with the true gradient ``G z``, and the
rows that meet the tolerance leave the batch.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

from torchjd.linalg._kkt import kkt_residual

_ALPHA = 1.6  # over-relaxation, within the usual [1.5, 1.8]
# On a Jacobi-scaled problem (unit diagonal, well-conditioned): stronger over-relaxation and a
# larger first penalty (a multiple of the mean eigenvalue of 2G) save a third of the iterations on
# per-sample Gramians later in training.
_SCALED_ALPHA = 1.8
_SCALED_RHO = 1.5
_CHECK_EVERY = 5
_MAX_REFACTORISATIONS = 8


class Warm(NamedTuple):
    """A state of the iterations: rows ``v``, their multipliers ``ρ y`` (``−2 G v`` at the
    solution) and the penalty ``ρ``."""

    Z: Tensor
    multipliers: Tensor
    rho: float


def admm(G: Tensor, U: Tensor, tol: float, max_iters: int) -> tuple[Tensor, Tensor]:
    """Feasible rows ``z ≥ u`` whose KKT residual is below ``tol`` (or the last iterate, after
    ``max_iters``), and which rows met the tolerance."""
    out, converged, _ = warm_admm(G, U, tol, max_iters)
    return out, converged


def warm_admm(
    G: Tensor,
    U: Tensor,
    tol: float,
    max_iters: int,
    warm: Warm | None = None,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Warm]:
    """:func:`admm` from the state ``warm`` (of the same rows), and the state it ends in.

    With ``scale`` (``s``, positive), the iterations run in ``z = v / s``, on ``S G S`` and
    ``u / s`` (``S = diag(s)``); the residuals, the output and the states are those of ``v``."""
    G_original, U_original = G, U
    if scale is not None:
        G = scale.unsqueeze(1) * G * scale.unsqueeze(0)
        U = U / scale
    s = torch.ones_like(G.diagonal()) if scale is None else scale
    alpha = _ALPHA if scale is None else _SCALED_ALPHA
    m = G.shape[0]
    out = torch.empty_like(U)
    out_multipliers = torch.zeros_like(U)
    converged = torch.zeros(U.shape[0], dtype=torch.bool, device=U.device)
    rows = torch.arange(U.shape[0], device=U.device)
    trace = float(G.diagonal().sum().detach())
    rho = 2 * trace / m  # the mean eigenvalue of the Hessian 2G
    rho = warm.rho if warm is not None else rho if scale is None else _SCALED_RHO * rho
    rho_min = trace * math.sqrt(torch.finfo(G.dtype).eps)
    M = _linear_step(G, rho)
    Z = U.clone() if warm is None else torch.maximum(warm.Z / s, U)
    Y = torch.zeros_like(U) if warm is None else warm.multipliers * (s / rho)
    n_refactorisations = 0
    for iteration in range(1, max_iters + 1):
        V = (Z - Y) @ M
        V.mul_(alpha).add_(Z, alpha=1 - alpha)
        Z_previous = Z
        Z = torch.maximum(V + Y, U)
        Y.add_(V).sub_(Z)
        if iteration % _CHECK_EVERY and iteration != max_iters:
            continue

        if scale is None:
            residual = kkt_residual(G, U, Z, Z @ G)
        else:
            residual = kkt_residual(G_original, U_original[rows], s * Z, (Z @ G) / s)
        met = ~(residual > tol)  # NaN rows are done too: they cannot improve
        done = met | (iteration == max_iters)
        if done.any():
            out[rows[done]] = Z[done]
            out_multipliers[rows[done]] = Y[done] * (rho / s)
            converged[rows[done]] = met[done]
            keep = ~done
            if not keep.any():
                break
            rows, U, Z, Y, V, Z_previous = (t[keep] for t in (rows, U, Z, Y, V, Z_previous))

        if n_refactorisations < _MAX_REFACTORISATIONS:
            # Residual balancing: a relatively large primal residual asks for a larger penalty.
            primal = (V - Z).norm() / torch.maximum(V.norm(), Z.norm())
            dual = (Z - Z_previous).norm() / Y.norm()
            ratio = float((primal / dual).sqrt().detach())
            if 0.0 < ratio < math.inf and (ratio > 5.0 or ratio < 0.2):
                ratio = max(ratio, rho_min / rho)
                rho *= ratio
                Y /= ratio
                M = _linear_step(G, rho)
                n_refactorisations += 1
    if scale is not None:
        out = torch.maximum(s * out, U_original)  # feasible despite the scaling's rounding
    return out, converged, Warm(out, out_multipliers, rho)


def _linear_step(G: Tensor, rho: float) -> Tensor:
    """``ρ (2G + ρI)⁻¹``: the update ``v = (z − y) M`` shared by every row."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    L, _ = torch.linalg.cholesky_ex(2 * G + rho * eye)
    return torch.cholesky_inverse(L) * rho
