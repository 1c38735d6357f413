"""The interior point against quadprog, and its step length against a brute-force one."""

import pytest
import torch

from tests.reference.dual_cone import with_quadprog
from torchjd.linalg._interior_point import _longest_step_inverse, interior_point


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
    # The longest step (its inverse) against a brute-force one, entry by entry: x + α dx ≥ 0 and
    # z + α dz ≥ 0 hold at α = 1 / inverse, with equality at one entry, and no bound (inverse
    # ≤ 0) when no direction decreases.
    g = torch.Generator().manual_seed(seed)
    x, z = torch.rand(2, 6, 8, generator=g, dtype=torch.float64) + 1e-3
    dx, dz = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    dx[0], dz[0] = dx[0].abs(), dz[0].abs()  # a row without bound
    inverse = _longest_step_inverse(x, z, dx, dz).squeeze(1)
    ratios = torch.cat([-x / dx, -z / dz], dim=1)
    decreasing = torch.cat([dx, dz], dim=1) < 0
    expected = torch.where(decreasing, ratios, torch.inf).amin(dim=1)
    assert inverse[0] <= 0
    torch.testing.assert_close(1 / inverse[1:], expected[1:], rtol=1e-12, atol=0)
    alpha = (1 / inverse[1:]).unsqueeze(1)
    assert (x[1:] + alpha * dx[1:] >= -1e-12).all()
    assert (z[1:] + alpha * dz[1:] >= -1e-12).all()
