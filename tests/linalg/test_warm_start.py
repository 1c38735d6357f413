"""Pivoting warm-started by ADMM (exact mode beyond ``m = 64``), on the large-``m`` settings
(float32 guess, chunks of rows) brought down to small sizes, against the interior point in float64
(an independent method) and the KKT conditions on ``G`` itself."""

import pytest
import torch

from tests.reference.matrices import make
from torchjd.linalg import _warm_start
from torchjd.linalg._bounded_qp import _least_norm_fallback, solve_lower_bounded_qp, tikhonov
from torchjd.linalg._kkt import kkt_residual


@pytest.fixture
def large_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings of ``m ≥ 512`` from ``m = 65`` on, with chunks of 16 rows at ``m = 72``."""
    monkeypatch.setattr(_warm_start, "_FLOAT32_MIN_M", 65)
    monkeypatch.setattr(_warm_start, "_CHUNK_ENTRIES", 16 * 72**2)


@pytest.mark.usefixtures("large_settings")
@pytest.mark.parametrize(
    "family", ["normal", "rank_deficient", "duplicate_rows", "opposite_rows", "mixed_row_norms"]
)
@pytest.mark.parametrize("n", [9, 36, 90])
def test_matches_the_interior_point(family: str, n: int):
    m = 72
    J = make(family, m, n, seed=m + n)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    V = solve_lower_bounded_qp(G, U, least_norm=True)
    assert (V >= U).all()
    assert kkt_residual(G, U, V, V @ G).max() <= 1e-9
    reference = _least_norm_fallback(tikhonov(G), G, U, 1e-10)
    scale = J.norm(dim=1).max()  # the KKT residual bounds the error relative to it
    torch.testing.assert_close(V @ J / scale, reference @ J / scale, rtol=0, atol=1e-7)
    # The weights themselves are not compared: with near-duplicate rows of very different norms,
    # neither method reaches the least-energy weights on every row (both are optimal, with
    # energies a few percent apart either way).


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_meets_the_tolerance_at_260_rows(dtype: torch.dtype):
    """Unpatched, beyond 256 rows: a Gramian of rank 12 with near-duplicate and opposite rows."""
    m = 260
    J = make("rank_deficient", m, 12, seed=0)
    J[:20] = -J[20:40]
    G = (J @ J.T).to(dtype)
    U = torch.eye(m, dtype=dtype)
    V = solve_lower_bounded_qp(G, U, least_norm=True)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert (V >= U).all()
    assert kkt_residual(G.double(), U.double(), V.double(), V.double() @ G.double()).max() <= tol
