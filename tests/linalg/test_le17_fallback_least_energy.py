"""The exact mode's fallback rows (interior point, then ``least_energy_rows`` with ``keep_free``):
the interior point leaves small weights above their bounds where ``(G v)_j`` is small but not
tight; set to their bounds, they moved the update off the optimum, the least-energy candidate
missed the tolerance and the row stayed as heavy as the interior point left it. Such a row now
gets a second candidate that keeps them, with the row's own update."""

import numpy as np
import torch
from benchmarks.non_conflict import hard_jacobian

from tests.linalg.test_xs3_give_up import least_energy_gap
from tests.linalg.test_xs5_least_energy import singular_jacobian
from tests.reference.dual_cone import kkt_violation
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, _exact_unit_route, tikhonov
from torchjd.linalg._interior_point import interior_point
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._range_projection import least_energy_rows
from torchjd.linalg._spanning import range_factor

TOL = LEAST_NORM_TOL[torch.float64]


def benchmark_jacobian(seed: int, m: int, index: int) -> torch.Tensor:
    """The ``index``-th float64 Jacobian of ``benchmarks/non_conflict.py``'s stream (``--seed``
    ``seed``, size ``m``), normalised as the exact mode's Gramian is (unit trace)."""
    g = torch.Generator().manual_seed(seed + m)
    for _ in range(index + 1):
        J = hard_jacobian(m, g)
    return J / (J * J).sum().sqrt()


def test_fallback_rows_have_least_energy():
    """The benchmark's Jacobian #58 at ``m = 64`` (seed 0; rank 27, rows that pivoting leaves to
    the interior point): every row is optimal with the least-energy weights of its update (four
    rows missed the linear program's certificate by 0.2, 3·10⁻⁴ heavier than those weights)."""
    J = benchmark_jacobian(0, 64, 58)
    V = _exact_unit_route(J @ J.T, TOL, 10_000)
    G_np, J_np = (J @ J.T).numpy(), J.numpy()
    for u, v in zip(np.eye(64), V.numpy(), strict=True):
        assert kkt_violation(G_np, u, v) <= 1e-8
        assert least_energy_gap(J_np, u, v) <= 1e-6


def test_keep_free_is_never_heavier():
    """On interior-point rows of singular Gramians (duplicate, opposite and zero rows, norms over
    decades; the interior point stopped at ``tol``, leaving the small weights), each row with
    ``keep_free`` meets ``tol`` where it changed, and is at most as heavy as without it (a second
    candidate only replaces rows whose first one missed ``tol``) and as the interior point's row;
    some rows take the second candidate."""
    second = 0
    for seed in range(6):
        features = [seed % 2 == 0, True, seed < 3, seed % 3 == 0, True]
        J = singular_jacobian(24, 1.5, 0.4, features, seed)
        G = J @ J.T
        factor = range_factor(G, torch.float64)
        assert factor is not None
        U = torch.eye(24, dtype=G.dtype)
        V = torch.maximum(interior_point(tikhonov(G), U, TOL), U)
        plain = least_energy_rows(G, U, V, TOL, factor)
        both = least_energy_rows(G, U, V, TOL, factor, keep_free=True)
        weights = G.diagonal()
        energy = [(weights * X * X).sum(dim=1) for X in (V, plain, both)]
        assert bool((energy[2] <= energy[1]).all())
        assert bool((energy[2] <= energy[0]).all())
        changed = (both != V).any(dim=1)
        assert bool((kkt_residual(G, U, both, both @ G)[changed] <= TOL).all())
        assert bool((kkt_residual(G, U, V, V @ G)[changed] <= TOL).all())
        second += int((both != plain).any(dim=1).sum())
    assert second > 0
