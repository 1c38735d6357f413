"""The step length of the interior point, against a brute-force one."""

import pytest
import torch

from torchjd.linalg._interior_point import _longest_step_inverse


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
