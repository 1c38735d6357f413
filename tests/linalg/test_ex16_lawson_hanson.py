"""The active-set method of :mod:`torchjd.linalg._lawson_hanson` against the enumeration of every
active set, on small singular Gramians, from starts that free every index (its step back can then
empty the passive set) or none: the update ``Jᵀv`` of each row is the projection's (unique, where
the weights are not), and its KKT conditions hold on ``G``."""

import numpy as np
import pytest
import torch

from tests.reference.dual_cone import brute_force_singular, kkt_violation
from tests.reference.matrices import make
from torchjd.linalg._lawson_hanson import lawson_hanson_rows


@pytest.mark.parametrize(
    "family", ["rank_deficient", "duplicate_rows", "opposite_rows", "zero_row", "normal"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("start", ["none", "all", "random"])
def test_against_enumeration(family: str, seed: int, start: str):
    m, n = 7, 3
    J = make(family, m, n, seed=seed)
    J = J / (J * J).sum().sqrt()
    G = J @ J.T
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(4, m, generator=g, dtype=torch.float64)
    U[0] = torch.eye(m, dtype=torch.float64)[seed]  # (a unit row, as UPGrad's)
    if start == "none":
        V = U
    elif start == "all":
        V = U + 1.0  # (every index free)
    else:
        V = U + torch.rand(4, m, generator=g, dtype=torch.float64) * (
            torch.rand(4, m, generator=g, dtype=torch.float64) < 0.5
        )
    X = lawson_hanson_rows(G, U, V, 3 * m + 10)
    assert bool((X >= U).all())
    G_np, J_np = G.numpy(), J.numpy()
    for u, x in zip(U.numpy(), X.numpy(), strict=True):
        optimum = brute_force_singular(G_np, u)
        assert kkt_violation(G_np, u, x) <= 1e-9
        np.testing.assert_allclose(J_np.T @ x, J_np.T @ optimum, atol=1e-8)
