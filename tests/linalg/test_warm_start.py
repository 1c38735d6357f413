"""Pivoting warm-started by ADMM (exact mode beyond ``m = 64``), on the large-``m`` settings
(float32 guess, chunks of rows) brought down to small sizes, against the interior point in float64
(an independent method) and the KKT conditions on ``G`` itself."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.dual_cone import brute_force
from tests.reference.matrices import make
from torchjd.linalg import _warm_start
from torchjd.linalg._bounded_qp import _least_norm_fallback, solve_lower_bounded_qp, tikhonov
from torchjd.linalg._kkt import kkt_residual


@pytest.fixture
def large_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings of ``m ≥ 512`` from ``m = 65`` on, with chunks of 16 rows at ``m = 72``."""
    monkeypatch.setattr(_warm_start, "_FLOAT32_MIN_M", 65)
    monkeypatch.setattr(_warm_start, "_CHUNK_ENTRIES", 16 * 72**2)


@pytest.mark.parametrize("guess", ["large", "scaled"])
@pytest.mark.parametrize(
    "family", ["normal", "rank_deficient", "duplicate_rows", "opposite_rows", "mixed_row_norms"]
)
@pytest.mark.parametrize("n", [9, 36, 90])
def test_matches_the_interior_point(
    guess: str, family: str, n: int, request: pytest.FixtureRequest
):
    """With either guess: that of ``m ≥ 512`` (brought down to ``m = 72``) or the scaled one."""
    if guess == "large":
        request.getfixturevalue("large_settings")
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


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=30),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_batches_split_off_the_wide_faces(sizes: list[int], seed: int):
    """The batches partition the rows; when there are two, the second holds exactly the rows whose
    guessed face (free indices) is wider than ``_WIDE`` times the median."""
    m = 40
    g = torch.Generator().manual_seed(seed)
    free = torch.rand(len(sizes), m, generator=g).argsort(dim=1) < torch.tensor(sizes).unsqueeze(1)
    batches = _warm_start._batches(~free)
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == list(range(len(sizes)))
    widths = torch.tensor(sizes, dtype=torch.float64)
    wide = widths > _warm_start._WIDE * widths.median()
    if len(batches) == 2:
        assert wide[batches[1]].all()
        assert not wide[batches[0]].any()
    else:
        assert len(batches) == 1
        assert wide.all() or not wide.any()


@pytest.mark.usefixtures("large_settings")
@pytest.mark.parametrize("family", ["rank_deficient", "duplicate_rows", "opposite_rows"])
def test_wide_guesses_match_the_interior_point(family: str, monkeypatch: pytest.MonkeyPatch):
    """Rows whose guess frees every index (pivoted in their own batch) that pivoting solves end at
    the same updates as the interior point, and meet the tolerance on ``G``."""
    m = 72
    J = make(family, m, 30, seed=7)
    G = J @ J.T
    admm = _warm_start.admm

    def wide_guess(G: torch.Tensor, U: torch.Tensor, tol: float, max_iters: int):
        Z, converged = admm(G, U, tol, max_iters)
        Z[::5] = U[::5] + 1.0  # every index free
        return Z, converged

    batches = []

    def spied_batches(active: torch.Tensor) -> list[torch.Tensor]:
        batches.append(_warm_start._batches.__wrapped__(active))
        return batches[-1]

    spied_batches.__wrapped__ = _warm_start._batches  # type: ignore[attr-defined]
    monkeypatch.setattr(_warm_start, "admm", wide_guess)
    monkeypatch.setattr(_warm_start, "_batches", spied_batches)
    U = torch.eye(m, dtype=torch.float64)
    V, converged = _warm_start.warm_started_pivoting(tikhonov(G), G, U, 1e-9, 10_000)
    assert any(len(b) == 2 for b in batches)
    assert converged[::5].any()
    assert (V >= U).all()
    assert kkt_residual(G, U, V, V @ G)[converged].max() <= 1e-9
    reference = _least_norm_fallback(tikhonov(G), G, U, 1e-10)
    scale = J.norm(dim=1).max()
    torch.testing.assert_close(
        V[converged] @ J / scale, reference[converged] @ J / scale, rtol=0, atol=1e-7
    )


@settings(max_examples=20, deadline=None)
@given(m=st.integers(4, 8), spread=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_scaled_guess_is_the_active_set_of_its_problem(m: int, spread: float, seed: int):
    """On a well-conditioned ``G`` (rows of norms over ``spread`` decades), the guess labels every
    index whose scaled weight is clearly away from the threshold as the optimum of the guess's
    problem ``min_{v ≥ u} vᵀ (G + σ diag(G)) v`` (a brute force over the faces) does."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, 2 * m, generator=g, dtype=torch.float64)
    J = J * 10 ** (spread * torch.rand(m, 1, generator=g, dtype=torch.float64))
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    active = _warm_start._scaled_guess(G, U, 300)
    root = G.diagonal().sqrt()
    G_guess = (G + _warm_start._GUESS_SIGMA * torch.diag(G.diagonal())).numpy()
    threshold = _warm_start._GUESS_ACTIVE
    for u, guessed in zip(U, active, strict=True):
        v = torch.from_numpy(brute_force(G_guess, u.numpy()))
        scaled = (v - u) * root / (u * root).abs().max()
        clear = (scaled < threshold / 2) | (scaled > 2 * threshold)
        assert torch.equal(guessed[clear], (scaled < threshold)[clear])
