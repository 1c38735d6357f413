"""Independent references for the dual-cone problem ``min_{v ≥ u} vᵀ G v``, in float64 NumPy.

Written from the KKT conditions only (no code shared with the library):
``v ≥ u``, ``μ = G v ≥ 0``, ``μ ⊙ (v − u) = 0``.
"""

from collections.abc import Callable
from itertools import combinations

import numpy as np
import quadprog


def brute_force(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Enumerates every active set ``A`` (where ``v = u``) and returns the face solution that meets
    the KKT conditions. For positive-definite ``G`` (unique solution) and m ≤ 10.

    On the face of ``A``: ``v_A = u_A`` and ``G_FF v_F = −G_FA u_A``.
    """
    return _enumerate_faces(G, u, np.linalg.solve, 1e-12)


def with_quadprog(G: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Rows solved by Goldfarb-Idnani's dual method (the ``quadprog`` package); G must be
    positive definite."""
    m = G.shape[0]
    rows = [quadprog.solve_qp(2 * G, np.zeros(m), np.eye(m), u, 0)[0] for u in U]
    return np.array(rows)


def kkt_violation(G: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """The largest violation of the KKT conditions, relative to ``max|G| · max|u|`` (and
    ``max|u|`` for feasibility, ``max|G| · max|u|²`` for complementarity)."""
    u_scale = max(np.abs(u).max(), 1e-300)
    g_scale = max(np.abs(G).max(), 1e-300) * u_scale
    mu = G @ v
    primal = np.clip(u - v, 0, None).max() / u_scale
    dual = np.clip(-mu, 0, None).max() / g_scale
    complementarity = (np.abs(mu) * np.abs(v - u)).max() / (g_scale * u_scale)
    return float(max(primal, dual, complementarity))


def brute_force_singular(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Like :func:`brute_force`, for any PSD ``G``: face systems by least squares (a singular face
    system is consistent), returning one optimal point (not unique when ``G`` is singular)."""
    return _enumerate_faces(G, u, lambda A, b: np.linalg.lstsq(A, b, rcond=None)[0], 1e-10)


def _enumerate_faces(
    G: np.ndarray,
    u: np.ndarray,
    face_solve: Callable[[np.ndarray, np.ndarray], np.ndarray],
    tol: float,
) -> np.ndarray:
    m = len(u)
    u_scale = max(np.abs(u).max(), 1e-300)
    g_scale = max(np.abs(G).max(), 1e-300) * u_scale
    for size in range(m + 1):
        for A in combinations(range(m), size):
            F = [j for j in range(m) if j not in A]
            v = u.astype(np.float64).copy()
            if F:
                rhs = -G[np.ix_(F, list(A))] @ u[list(A)] if A else np.zeros(len(F))
                v[F] = face_solve(G[np.ix_(F, F)], rhs)
            mu = G @ v
            if (
                (v >= u - tol * u_scale).all()
                and (mu >= -tol * g_scale).all()
                and (np.abs(mu[F]) <= tol * g_scale).all()
            ):
                return v
    raise AssertionError("no KKT point found")


def least_energy_optimum(J: np.ndarray, u: np.ndarray, optimum: np.ndarray) -> np.ndarray:
    """Among the optimal ``v`` (``v ≥ u`` with the update of ``optimum``: ``Qᵀv = Qᵀ optimum`` for
    an orthonormal basis ``Q`` of the column space of ``J``, from its SVD), the one minimising
    ``Σ_j ‖J_j‖² v_j²`` (zero rows weighted ``1e-6 max_j ‖J_j‖²``), by quadprog."""
    left, singular_values, _ = np.linalg.svd(J, full_matrices=False)
    Q = left[:, singular_values > 1e-12 * max(singular_values.max(initial=0.0), 1e-300)]
    squared_norms = (J * J).sum(axis=1)
    if squared_norms.max() == 0.0:
        squared_norms = np.ones_like(squared_norms)
    weights = np.where(squared_norms > 0, squared_norms, 1e-6 * squared_norms.max())
    m = len(u)
    constraints = np.concatenate([Q, np.eye(m)], axis=1)
    bounds = np.concatenate([Q.T @ optimum, u])
    return quadprog.solve_qp(2 * np.diag(weights), np.zeros(m), constraints, bounds, Q.shape[1])[0]
