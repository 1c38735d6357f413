"""The interior point against quadprog, and its step length against a brute-force one."""

import numpy as np
import pytest
import torch

from tests.reference.dual_cone import (
    brute_force_singular,
    kkt_violation,
    least_energy_optimum,
    with_quadprog,
)
from tests.reference.matrices import make
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, _least_norm_fallback, tikhonov
from torchjd.linalg._interior_point import _factorise, _most_negative_ratio, interior_point
from torchjd.linalg._kkt import kkt_residual


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("low_rank", [False, True])
def test_interior_point_matches_quadprog(seed: int, low_rank: bool):
    # Rows of mixed signs and scales (one of them tiny), on a dense positive-definite G, or on
    # G = L Lᵀ + diag(t) of low rank solved through the Woodbury identity: the rows stay feasible
    # and agree with Goldfarb-Idnani's dual method, relative to each row's max|u|, within 16
    # steps (13 needed: the predictor-corrector's fast convergence).
    g = torch.Generator().manual_seed(seed)
    m = 12
    if low_rank:
        L = torch.randn(m, 4, generator=g, dtype=torch.float64)
        t = 1e-3 * torch.rand(m, generator=g, dtype=torch.float64) + 1e-4
        G, factors = L @ L.T + torch.diag(t), (L, t)
    else:
        J = torch.randn(m, 2 * m, generator=g, dtype=torch.float64)
        G, factors = J @ J.T, None
    U = torch.randn(7, m, generator=g, dtype=torch.float64)
    U[0] *= 1e-6
    V = interior_point(G, U, 1e-12, max_iters=16, low_rank=factors)
    expected = torch.from_numpy(with_quadprog(G.numpy(), U.numpy()))
    u_scale = U.abs().amax(dim=1, keepdim=True)
    assert (V >= U).all()
    torch.testing.assert_close(V / u_scale, expected / u_scale, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_interior_point_step_reaches_the_boundary(seed: int):
    # The longest step (its inverse, −_most_negative_ratio) against a brute-force one, entry by
    # entry: x + α dx ≥ 0 and z + α dz ≥ 0 hold at α = 1 / inverse, with equality at one entry,
    # and no bound (inverse ≤ 0) when no direction decreases.
    g = torch.Generator().manual_seed(seed)
    x, z = torch.rand(2, 6, 8, generator=g, dtype=torch.float64) + 1e-3
    dx, dz = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    dx[0], dz[0] = dx[0].abs(), dz[0].abs()  # a row without bound
    inverse = -_most_negative_ratio(x, z, dx, dz).squeeze(1)
    ratios = torch.cat([-x / dx, -z / dz], dim=1)
    decreasing = torch.cat([dx, dz], dim=1) < 0
    expected = torch.where(decreasing, ratios, torch.inf).amin(dim=1)
    assert inverse[0] <= 0
    torch.testing.assert_close(1 / inverse[1:], expected[1:], rtol=1e-12, atol=0)
    alpha = (1 / inverse[1:]).unsqueeze(1)
    assert (x[1:] + alpha * dx[1:] >= -1e-12).all()
    assert (z[1:] + alpha * dz[1:] >= -1e-12).all()


@pytest.mark.parametrize("seed", range(3))
def test_factorise_solves_each_rows_shifted_system(seed: int):
    # Each row's (P + diag(d)) x = b, P singular (rank 3) and d over nine decades (as z / x near
    # the solution), against torch.linalg.solve on the unscaled systems; P is left as it was
    # (the Jacobi-scaled copy is formed in place).
    g = torch.Generator().manual_seed(seed)
    m, k = 9, 6
    J = torch.randn(m, 3, generator=g, dtype=torch.float64)
    P = 2 * J @ J.T
    before = P.clone()
    d = 10 ** (9 * torch.rand(k, m, generator=g, dtype=torch.float64) - 3)
    b = torch.randn(k, m, generator=g, dtype=torch.float64)
    x = _factorise(P, d)(b)
    expected = torch.linalg.solve(P + torch.diag_embed(d), b)
    assert torch.equal(P, before)
    residual = ((P + torch.diag_embed(d)) @ x.unsqueeze(2)).squeeze(2) - b
    assert (residual.norm(dim=1) <= 1e-10 * b.norm(dim=1)).all()
    torch.testing.assert_close(x, expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_interior_point_on_rows_of_spread_norms(seed: int):
    # Row norms spread over six decades (G_jj over twelve): each multiplier starts at its own
    # row's scale, and the rows agree with quadprog (on the Jacobi-scaled problem, which it
    # solves accurately), relative to each row's max|u|, within 14 steps (a start at the largest
    # row's scale needs up to 19 on these).
    g = torch.Generator().manual_seed(seed)
    m = 12
    J = torch.randn(m, 2 * m, generator=g, dtype=torch.float64)
    log_norms = 6 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 3
    J = J / J.norm(dim=1, keepdim=True) * 10**log_norms
    G = J @ J.T
    U = torch.randn(5, m, generator=g, dtype=torch.float64)
    V = interior_point(G, U, 1e-12, max_iters=14)
    s = G.diagonal().rsqrt()
    scaled = with_quadprog((s.unsqueeze(1) * G * s).numpy(), (U / s).numpy())
    expected = s * torch.from_numpy(scaled)
    u_scale = U.abs().amax(dim=1, keepdim=True)
    assert (V >= U).all()
    torch.testing.assert_close(V / u_scale, expected / u_scale, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "family", ["rank_deficient", "duplicate_rows", "opposite_rows", "zero_row"]
)
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("seed", [0, 2])
def test_fallback_against_brute_force(family: str, n: int, seed: int):
    # The interior point and its polish (the route of the rows that pivoting leaves), on the
    # unit vectors of a singular Gramian (8 rows, rank ≤ 4): against the enumeration of the
    # active sets, a KKT point on G itself whose update is the projection; against quadprog,
    # the weights of least Σ_j ‖J_j‖² v_j² among the optimal ones (the update fixed), within
    # 10⁻⁶ max|v| (the interior point's own weights, those of its Tikhonov term, are up to
    # 3·10⁻⁴ max|v| away here: the fallback replaces them by the least-norm ones).
    m = 8
    J = make(family, m, n, seed=seed)
    J = J / (J * J).sum().sqrt()
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    tol = LEAST_NORM_TOL[torch.float64]
    V = _least_norm_fallback(tikhonov(G), G, U, tol)
    assert (V >= U).all()
    assert (kkt_residual(G, U, V, V @ G) <= tol).all()
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        optimum = brute_force_singular(G.numpy(), u)
        assert kkt_violation(G.numpy(), u, v) <= 1e-8
        np.testing.assert_allclose(J.T.numpy() @ v, J.T.numpy() @ optimum, atol=1e-7)
        expected = least_energy_optimum(J.numpy(), u, optimum)
        np.testing.assert_allclose(v, expected, atol=1e-6 * max(1.0, np.abs(expected).max()))
