"""Exact mode on singular Gramians whose optima are unique (``_unique_face``): every certified row
against an independent reference (a brute force over the faces: a unique optimum is the one it
finds), and the certificate refusing optima that are not unique."""

from unittest import mock

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.dual_cone import brute_force_singular
from torchjd.linalg import _bounded_qp, _unique_face
from torchjd.linalg._bounded_qp import _least_norm_fallback, solve_lower_bounded_qp, tikhonov
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._unique_face import unique_optimum, unique_optimum_rows


def tall_jacobian(m: int, n: int, duplicates: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    J = J * 10 ** (torch.rand(m, 1, generator=g, dtype=torch.float64) - 0.5)
    J[:duplicates] = J[duplicates : 2 * duplicates]
    return J


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(6, 9),
    duplicates=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_certified_rows_are_the_least_energy_optima(m: int, duplicates: int, seed: int):
    J = tall_jacobian(m, m // 2, duplicates, seed)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    X, certified = unique_optimum_rows(G, U, 1e-9, m // 2)
    assert (X >= U).all()
    for u, x, ok in zip(U.numpy(), X.numpy(), certified.tolist(), strict=True):
        if not ok:
            continue
        # A unique optimum is the one the brute force finds (the least-energy one too).
        expected = brute_force_singular(G.numpy(), u)
        np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-7 * np.abs(expected).max())


def test_duplicate_free_rows_are_not_unique():
    """Two equal rows that both carry weight: moving weight between them keeps the optimum."""
    J = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.1]], dtype=torch.float64)
    G = J @ J.T
    U = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    V = torch.tensor([[0.5, 0.5, 1.0]], dtype=torch.float64)  # optimal: Jᵀv = (0, 0.1)
    assert kkt_residual(G, U, V, V @ G).item() <= 1e-12
    assert not unique_optimum(G, U, V, V @ G).item()
    single = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)  # another optimum
    assert not unique_optimum(G, U, single, single @ G).item()


def test_independent_free_rows_are_unique():
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    G = J @ J.T  # rank 2, 4 rows: the first two are independent, the third opposes both
    U = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    V = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)  # Jᵀv = 0, but not unique
    assert not unique_optimum(G, U, V, V @ G).item()  # the fourth row has (Gv)_4 = 0
    J2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)
    G2 = J2 @ J2.T
    U2 = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    V2 = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)  # Jᵀv = (0, 0.5), row 2 at bound
    assert kkt_residual(G2, U2, V2, V2 @ G2).item() <= 1e-12
    assert unique_optimum(G2, U2, V2, V2 @ G2).item()


def test_tall_gramian_takes_the_unique_route(monkeypatch):
    """A tall Jacobian (rank m / 2, no positive span) beyond the spanning threshold, the route
    enabled from this size (by default from m = 512): the rows are certified unique (few reach
    the Tikhonov pivoting route); each is optimal on G."""
    m = 80
    monkeypatch.setattr(_bounded_qp, "_UNIQUE_MIN_M", m)
    J = tall_jacobian(m, m // 2, 0, 3)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    calls = []
    route = _bounded_qp._pivoting_route

    def counted(G: torch.Tensor, G_exact: torch.Tensor, U: torch.Tensor, *args):  # type: ignore[no-untyped-def]
        calls.append(U.shape[0])
        return route(G, G_exact, U, *args)

    monkeypatch.setattr(_bounded_qp, "_pivoting_route", counted)
    V = solve_lower_bounded_qp(G, U, least_norm=True)
    assert kkt_residual(G, U, V, V @ G).max() <= 1e-9
    assert sum(calls) <= m // 4


def test_near_duplicate_rows_meet_the_tolerance_on_g():
    """Beyond m = 64, near-duplicate rows (G barely nonsingular): the rows that the interior point
    and its Tikhonov polish left just short of the tolerance are finished on the faces of G."""
    m = 72
    g = torch.Generator().manual_seed(m)
    J = torch.randn(m, 4 * m, generator=g, dtype=torch.float64)
    J[: m // 8] = J[m // 8 : m // 4] + 1e-6 * torch.randn(m // 8, 4 * m, generator=g, dtype=J.dtype)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    V = solve_lower_bounded_qp(G, U, least_norm=True)
    G = (G + G.T) / 2
    assert (V >= U).all()
    assert kkt_residual(G, U, V, V @ G).max() <= 1e-9


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 80), residue=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_probe_runs_the_rest_only_after_a_certified_row(k: int, residue: int, seed: int):
    """With a stand-in certificate (rows whose unit index is ``residue`` mod 7): the probe's rows
    go first; the others run only when some probe row is certified, and each row lands in place."""
    m = 80
    order = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    U = torch.eye(m, dtype=torch.float64)[order[:k]]
    calls = []

    def stand_in(G: torch.Tensor, U: torch.Tensor, tol: float, rank: int):
        calls.append(U.shape[0])
        index = U.argmax(dim=1)
        return U + index.unsqueeze(1).double(), index % 7 == residue

    with mock.patch.object(_unique_face, "certified_rows", stand_in):
        X, certified = unique_optimum_rows(torch.eye(m, dtype=torch.float64), U, 1e-9, m)
    index = U.argmax(dim=1)
    expected = index % 7 == residue
    solved = U + index.unsqueeze(1).double()
    probe_rows = _unique_face._PROBE_ROWS
    if calls == [probe_rows] and k > 2 * probe_rows:
        # No probe row certified: the others are left as they were.
        done = (X != U).any(dim=1)
        assert int(done.sum()) == probe_rows
        assert not expected[done].any()
        assert not certified.any()
        torch.testing.assert_close(X[done], solved[done])
        torch.testing.assert_close(X[~done], U[~done])
        return
    assert calls == ([k] if k <= 2 * probe_rows else [probe_rows, k - probe_rows])
    assert torch.equal(certified, expected)
    torch.testing.assert_close(X, solved)


def test_probed_rows_match_the_interior_point():
    """Beyond the probe's size (48 rows of rank 24, a few duplicates), every certified row is the
    unique optimum: the interior point (an independent method) finds the same weights."""
    m = 48
    J = tall_jacobian(m, m // 2, 3, 11)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    X, certified = unique_optimum_rows(G, U, 1e-9, m // 2)
    assert certified.sum() >= 5
    assert (X >= U).all()
    assert kkt_residual(G, U[certified], X[certified], X[certified] @ G).max() <= 1e-9
    reference = _least_norm_fallback(tikhonov(G), G, U[certified], 1e-10)
    torch.testing.assert_close(X[certified], reference, rtol=0, atol=1e-6)
