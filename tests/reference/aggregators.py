"""Slow, obvious implementations of the aggregators, written from the papers' definitions.

UPGrad and DualProj are computed in the *primal*, in the space of the gradients: each vector is
projected onto the dual cone ``{d : J' d ≥ 0}`` by a generic QP solver (``quadprog``), with no use
of the weight-space formulation that the library solves. The regularised Gramian of the paper,
``G / tr(G) + ε I``, is the Gramian of the augmented matrix ``J' = [J / √tr(G), √ε I]``, so the
projection is done on ``J'`` and the weights are recovered from ``J'ᵀ v = d'``.
"""

import numpy as np
import quadprog


def _augmented(J: np.ndarray, norm_eps: float, reg_eps: float) -> np.ndarray:
    m = J.shape[0]
    trace = float((J * J).sum())
    scaled = J / np.sqrt(trace) if trace >= norm_eps else np.zeros_like(J)
    return np.concatenate([scaled, np.sqrt(reg_eps) * np.eye(m)], axis=1)


def project_onto_dual_cone(J: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``argmin_{d : J d ≥ 0} ‖d − x‖²`` for ``x`` in the row space of ``J``.

    The projection stays in the row space, so it is solved in the coordinates ``c`` of an
    orthonormal basis ``Q`` of that space (``d = Q c``): min ½cᵀc − (Qᵀx)ᵀc s.t. (J Q) c ≥ 0.
    """
    Q, _ = np.linalg.qr(J.T)
    c = quadprog.solve_qp(np.eye(Q.shape[1]), Q.T @ x, (J @ Q).T, np.zeros(J.shape[0]), 0)[0]
    return Q @ c


def _weights_of(J_aug: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(J_aug.T, d, rcond=None)[0]


def upgrad_weights(
    J: np.ndarray, pref: np.ndarray | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> np.ndarray:
    """``w = Σ_i v_i`` where ``J'ᵀ v_i = π(J'ᵀ p_i e_i)`` (Quinton & Rey, 2024, Definition 4)."""
    m = J.shape[0]
    pref = np.full(m, 1.0 / m) if pref is None else pref
    J_aug = _augmented(J, norm_eps, reg_eps)
    projections = [project_onto_dual_cone(J_aug, pref[i] * J_aug[i]) for i in range(m)]
    return sum(_weights_of(J_aug, d) for d in projections)


def dualproj_weights(
    J: np.ndarray, pref: np.ndarray | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> np.ndarray:
    """``w`` with ``J'ᵀ w = π(J'ᵀ p)``."""
    m = J.shape[0]
    pref = np.full(m, 1.0 / m) if pref is None else pref
    J_aug = _augmented(J, norm_eps, reg_eps)
    return _weights_of(J_aug, project_onto_dual_cone(J_aug, J_aug.T @ pref))


def min_norm_in_hull(G: np.ndarray) -> np.ndarray:
    """``argmin_{w ∈ simplex} wᵀ G w`` (MGDA's exact target), with a small ridge for quadprog."""
    m = G.shape[0]
    P = 2 * G + 1e-12 * np.trace(G) * np.eye(m) + 1e-300 * np.eye(m)
    constraints = np.concatenate([np.ones((m, 1)), np.eye(m)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(m)])
    return quadprog.solve_qp(P, np.zeros(m), constraints, bounds, 1)[0]
