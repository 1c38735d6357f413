"""Independent references for the dual-cone problem ``min_{v ≥ u} vᵀ G v``, in float64 NumPy.

Written from the KKT conditions only (no code shared with the library):
``v ≥ u``, ``μ = G v ≥ 0``, ``μ ⊙ (v − u) = 0``.
"""

from itertools import combinations

import numpy as np
import quadprog


def brute_force(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Enumerates every active set ``A`` (where ``v = u``) and returns the face solution that meets
    the KKT conditions. For positive-definite ``G`` (unique solution) and m ≤ 10.

    On the face of ``A``: ``v_A = u_A`` and ``G_FF v_F = −G_FA u_A``.
    """
    m = len(u)
    g_scale = np.abs(G).max() * max(np.abs(u).max(), 1e-300)
    u_scale = max(np.abs(u).max(), 1e-300)
    for size in range(m + 1):
        for A in combinations(range(m), size):
            F = [j for j in range(m) if j not in A]
            v = u.astype(np.float64).copy()
            if F:
                rhs = -G[np.ix_(F, list(A))] @ u[list(A)] if A else np.zeros(len(F))
                v[F] = np.linalg.solve(G[np.ix_(F, F)], rhs)
            mu = G @ v
            if (v >= u - 1e-12 * u_scale).all() and (mu >= -1e-12 * g_scale).all():
                return v
    raise AssertionError("no KKT point found")


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
