"""The exact mode does not conflict on Jacobians with pairs of rows only nearly opposite
(``J_a = −c J_b`` plus noise of relative size ``10⁻⁶`` in float64, ``3·10⁻³`` in float32), where
the optimal weights are large (up to ``10⁸`` times ``u``): ``J_i · d ≥ −10⁻⁸ ‖J_i‖ max_j ‖J_j‖``
in float64, ``−10⁻⁴ …`` in float32 (issue 10), the update checked against scipy's NNLS on ``J``.

On the main branch before this fix, in float64 the interior point's rows (weights ``2·10⁴``,
biased by its Tikhonov term) were kept over the exact ones of the active-set method of
:mod:`torchjd.linalg._lawson_hanson`, whose plain KKT residual is inflated by rounding times its
weights: conflicts down to ``−7.6·10⁻⁸``, update off by a fifth of ``max‖J_j‖``; in float32, the
rows of ADMM-warm-started pivoting were accepted unchecked on ``G``: conflicts down to
``−9.3·10⁻⁴``; after that fix, the least-norm fallback's rows (interior point on a Tikhonov-biased
``G``, then polishes) still conflicted beyond ``10⁻⁴`` on 11 of the 20 float32 Jacobians of seeds
20 to 29 at ``3·10⁻³`` and ``6·10⁻³`` (down to ``−1.9·10⁻⁴``, update off by up to 0.16), now
solved again by :func:`~torchjd.linalg._bounded_qp._conflict_last_resort`."""

import numpy as np
import pytest
import scipy.optimize
import torch

from torchjd.linalg._bounded_qp import (
    LEAST_NORM_TOL,
    _conflict_last_resort,
    _exact_unit_route,
    solve_lower_bounded_qp,
)
from torchjd.linalg._kkt import worst_conflict


def nearly_paired_jacobian(m: int, n: int, pairs: int, zeros: int, separation: float, seed: int):
    """A float64 Jacobian (a shared direction, row norms over four decades) with ``pairs`` pairs of
    rows opposite up to ``separation`` (relative noise; ratio of norms in ``[0.1, 10]``) and
    ``zeros`` zero rows; returns it and the indices of the pairs' first rows."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    J = J + torch.randn(1, n, generator=g, dtype=torch.float64)
    J = J * 10 ** (4 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 2)
    rows = torch.randperm(m, generator=g)
    a, b = rows[:pairs], rows[pairs : 2 * pairs]
    c = 10 ** (2 * torch.rand(pairs, 1, generator=g, dtype=torch.float64) - 1)
    noise = torch.randn(pairs, n, generator=g, dtype=torch.float64) / n**0.5
    J[a] = -c * J[b] + separation * c * J[b].norm(dim=1, keepdim=True) * noise
    J[rows[2 * pairs : 2 * pairs + zeros]] = 0.0
    return J, a


def check(J: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bound: float, update_tol: float):
    """Feasible rows whose updates ``Jᵀv`` conflict with no row of ``J`` beyond ``bound`` (relative
    to ``‖J_i‖ max_j ‖J_j‖ max|u|``, in float64) and match scipy's NNLS on ``J`` within
    ``update_tol`` (relative to ``max_j ‖J_j‖ max|u|``)."""
    J, U, V = J.double(), U.double(), V.double()
    assert (V >= U).all()
    norms = J.norm(dim=1)
    u_scale = U.abs().amax(dim=1, keepdim=True)
    scales = (norms * norms.max()).clamp_min(1e-300) * u_scale
    conflicts = (V @ J) @ J.T / scales
    assert float(conflicts.min()) >= -bound, float(conflicts.min())
    J_np = J.numpy()
    for u, v, s in zip(U.numpy(), V.numpy(), u_scale.squeeze(1).numpy(), strict=True):
        lam = scipy.optimize.nnls(J_np.T, -(J_np.T @ u), maxiter=50 * len(u))[0]
        error = np.linalg.norm(J_np.T @ v - J_np.T @ (u + lam)) / (norms.max().item() * s)
        assert error <= update_tol, error


@pytest.mark.parametrize("seed", [1, 2])
def test_float64(seed: int):
    """``m = 80``, pairs ``10⁻⁶`` apart, unit vectors (on main, seed 1: 12 rows below ``−10⁻⁸``,
    down to ``−7.6·10⁻⁸``, update error 0.21), by the general rows' route and UPGrad's."""
    J, _ = nearly_paired_jacobian(80, 110, 8, 3, 1e-6, seed)
    G = J @ J.T
    U = torch.eye(80, dtype=torch.float64)
    check(J, U, solve_lower_bounded_qp(G, U, least_norm=True), 1e-8, 1e-3)
    check(J, U, _exact_unit_route(G, LEAST_NORM_TOL[torch.float64], 10_000), 1e-8, 1e-3)


def float32_case(seed: int, separation: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 Jacobian (``m = 96``, 10 pairs, 4 zero rows) and 12 rows ``u``: unit vectors of
    the pairs' rows and others, and rows of both signs."""
    m = 96
    J, a = nearly_paired_jacobian(m, 150, 10, 4, separation, seed)
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(m)
    return J.float(), torch.cat([eye[:4], eye[a[:4]], 2 * torch.rand(4, m, generator=g) - 1])


@pytest.mark.parametrize(
    ("seed", "separation"),
    [(20, 3e-3), (21, 3e-3), (28, 3e-3), (21, 6e-3)]
    + [(seed, 3e-3) for seed in (22, 23, 25, 26, 29)]
    + [(seed, 6e-3) for seed in (20, 22, 23, 25, 26, 29)],
)
def test_float32(seed: int, separation: float):
    """``m = 96``, pairs ``3·10⁻³`` to ``6·10⁻³`` apart, in float32 (before the ADMM rows were
    checked: conflicts down to ``−2·10⁻⁴``, ``−8·10⁻⁴``, ``−4·10⁻³`` and ``−9·10⁻⁴`` on the first
    four; before the fallback's rows were solved again, down to ``−1.9·10⁻⁴`` on the others,
    update off by up to 0.16). The update, from a Gramian rounded to float32 whose pairs it
    barely tells apart, is checked only loosely against the reference."""
    J, U = float32_case(seed, separation)
    check(J, U, solve_lower_bounded_qp(J @ J.T, U, least_norm=True), 1e-4, 0.05)


def test_conflict_last_resort_keeps_rows():
    """Rows within ``tol`` (here, unit vectors of zero rows of ``J``) come back unchanged; the
    others (from ``v = u``) feasible and in no worse conflict, the random ones within ``10⁻⁴``."""
    J, U = float32_case(22, 3e-3)
    G = (J @ J.T).double()
    zero = (G.diagonal() == 0).nonzero().squeeze(1)
    U = torch.cat([torch.eye(96, dtype=torch.float64)[zero], U.double()])
    V = U.clone()
    tol = LEAST_NORM_TOL[torch.float32]
    before = worst_conflict(G, U, V @ G)
    after_V = _conflict_last_resort(G, U, V.clone(), tol)
    after = worst_conflict(G, U, after_V @ G)
    within = before <= tol
    assert within.any()
    assert (~within).any()
    assert torch.equal(after_V[within], U[within])
    assert (after_V >= U).all()
    assert (after <= before).all()
    assert float(after[-4:].max()) <= 1e-4
