"""Small problems solved by trying every active set at once, against quadprog (Goldfarb-Idnani's
dual method, an independent algorithm) and the KKT conditions."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchjd.linalg._bounded_qp as bounded_qp
from tests.reference.dual_cone import brute_force_singular, kkt_violation, with_quadprog
from torchjd.linalg._bounded_qp import solve_lower_bounded_qp
from torchjd.linalg._enumeration import enumerate_active_sets


def _problem(m: int, n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=generator, dtype=torch.float64)
    J *= torch.logspace(-2, 2, m, dtype=torch.float64)[torch.randperm(m, generator=generator)][
        :, None
    ]  # row norms over four decades
    G = J @ J.T
    G = G / G.trace() + 1e-4 * torch.eye(m, dtype=torch.float64)
    U = torch.cat(
        [torch.eye(m, dtype=torch.float64), torch.randn(3, m, generator=generator).double()]
    )  # UPGrad's rows, and rows with negative entries (where v = 0 can be optimal)
    return G.to(dtype), U.to(dtype)


@given(
    m=st.integers(1, 8),
    n=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_enumeration_agrees_with_quadprog(m: int, n: int, seed: int):
    G, U = _problem(m, n, seed, torch.float64)
    X, residual = enumerate_active_sets(G, U)
    expected = with_quadprog(G.numpy(), U.numpy())
    scale = U.abs().amax(dim=1, keepdim=True).numpy()
    np.testing.assert_allclose(X.numpy() / scale, expected / scale, rtol=0, atol=1e-7)
    assert (residual <= 1e-9).all()


@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solver_uses_enumeration_up_to_eight_rows(m: int, dtype: torch.dtype, monkeypatch):
    calls = []

    def spy(G, U):
        calls.append(G.shape[0])
        return enumerate_active_sets(G, U)

    monkeypatch.setattr(bounded_qp, "enumerate_active_sets", spy)
    G, U = _problem(m, 4, m, dtype)
    V = solve_lower_bounded_qp(G, U)
    assert V.dtype == dtype
    expected = with_quadprog(G.double().numpy(), U.double().numpy())
    atol = 1e-4 if dtype == torch.float32 else 1e-8
    np.testing.assert_allclose(V.double().numpy(), expected, rtol=0, atol=atol)
    conflicted = (U.double() @ G.double()).amin(dim=1) < 0
    assert calls == ([m] if conflicted.any() else [])


def test_solver_does_not_use_enumeration_beyond_eight_rows(monkeypatch):
    monkeypatch.setattr(bounded_qp, "enumerate_active_sets", None)  # would raise if called
    G, U = _problem(9, 4, 0, torch.float64)
    V = solve_lower_bounded_qp(G, U)
    np.testing.assert_allclose(V.numpy(), with_quadprog(G.numpy(), U.numpy()), atol=1e-8)


def test_rows_whose_candidate_misses_the_tolerance_are_solved_another_way(monkeypatch):
    def wrong(G, U):  # as if rounding had spoilt every candidate
        return U.clone(), torch.full((U.shape[0],), 1.0, dtype=U.dtype)

    monkeypatch.setattr(bounded_qp, "enumerate_active_sets", wrong)
    G, U = _problem(6, 3, 1, torch.float64)
    V = solve_lower_bounded_qp(G, U)
    np.testing.assert_allclose(V.numpy(), with_quadprog(G.numpy(), U.numpy()), atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_singular_gramian_gives_an_optimum_or_says_it_did_not(seed: int):
    # Rank 2 with 5 rows and no regularisation: some faces are singular (no candidate from them);
    # the returned candidate is reported by its true residual, and the solver's answer is optimal.
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    G = J @ J.T
    U = torch.eye(5, dtype=torch.float64)
    X, residual = enumerate_active_sets(G, U)
    for u, x, r in zip(U.numpy(), X.numpy(), residual.tolist(), strict=True):
        if r <= 1e-9:
            assert kkt_violation(G.numpy(), u, x) <= 1e-8
    V = solve_lower_bounded_qp(G, U)
    Gn = G.numpy()
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        optimum = brute_force_singular(Gn, u)
        assert abs(v @ Gn @ v - optimum @ Gn @ optimum) <= 1e-7 * np.abs(Gn).max()
