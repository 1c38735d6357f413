"""The batched solver of ``min_{v ≥ u} vᵀ G v`` against independent references."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.reference.dual_cone import brute_force, kkt_violation, with_quadprog
from tests.reference.matrices import FACTORIES, make
from torchjd.linalg._bounded_qp import solve_lower_bounded_qp

# The contract of the issue: relative KKT residual below these, whatever G.
KKT_TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def regularised_gramian(J: torch.Tensor) -> torch.Tensor:
    G = J @ J.T
    trace = G.trace()
    G = G / trace if trace > 1e-4 else torch.zeros_like(G)
    return G + 1e-4 * torch.eye(len(G), dtype=G.dtype)


def upgrad_problems(m: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.eye(m, dtype=dtype) / m


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_matches_brute_force_enumeration(family: str, m: int):
    J = make(family, m, 6, seed=m)
    G = regularised_gramian(J)
    U = torch.cat([upgrad_problems(m, torch.float64), torch.rand(2, m, dtype=torch.float64)])
    V = solve_lower_bounded_qp(G, U)
    expected = np.array([brute_force(G.numpy(), u) for u in U.numpy()])
    np.testing.assert_allclose(V.numpy(), expected, rtol=1e-9, atol=1e-9 * U.abs().max().item())


@pytest.mark.parametrize(
    "family", ["normal", "rank_deficient", "mixed_row_norms", "duplicate_rows"]
)
@pytest.mark.parametrize("m", [16, 64, 65, 150])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_agrees_with_quadprog_on_large_problems(family: str, m: int, dtype: torch.dtype):
    """Above m = 64 the ADMM path runs: its KKT residual meets the contract and, since the
    solution's image ``Jᵀv`` is unique, its distance in the G-norm to the exact solution is tiny."""
    J = make(family, m, 2 * m, seed=m)
    G64 = regularised_gramian(J)
    U64 = upgrad_problems(m, torch.float64)
    V = solve_lower_bounded_qp(G64.to(dtype), U64.to(dtype)).double()
    expected = torch.from_numpy(with_quadprog(G64.numpy(), U64.numpy()))
    for u, v in zip(U64.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G64.numpy(), u, v) <= KKT_TOL[dtype]
    error = V - expected
    g_norm_error = torch.einsum("ki,ij,kj->k", error, G64, error).clamp_min(0).sqrt()
    g_norm = torch.einsum("ki,ij,kj->k", expected, G64, expected).sqrt()
    assert (g_norm_error <= 10 * KKT_TOL[dtype] ** 0.5 * g_norm).all()


SINGULAR_FAMILIES = sorted(set(FACTORIES) - {"mixed_row_norms"})


@pytest.mark.parametrize("family", SINGULAR_FAMILIES)
@pytest.mark.parametrize(("m", "n"), [(4, 3), (12, 5), (40, 40), (90, 30), (130, 400)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kkt_on_unregularised_gramians(family: str, m: int, n: int, dtype: torch.dtype):
    """Singular, unnormalised Gramians (zero, duplicate and opposite rows, rank-deficient, scales
    from 1e-6 to 1e4): the relative KKT residual still meets the contract. (Row norms spread over
    six orders of magnitude are tested on regularised Gramians above.)"""
    J = make(family, m, n, dtype=torch.float64, seed=n)
    G = J @ J.T
    U = torch.cat([upgrad_problems(m, torch.float64), torch.rand(3, m, dtype=torch.float64)])
    V = solve_lower_bounded_qp(G.to(dtype), U.to(dtype))
    assert V.dtype == dtype
    for u, v in zip(U.numpy(), V.double().numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= KKT_TOL[dtype]


@given(
    m=st.integers(1, 10),
    n=st.integers(1, 10),
    log_scale=st.floats(-6, 4),
    seed=st.integers(0, 2**16),
)
def test_kkt_property(m: int, n: int, log_scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    J = 10**log_scale * torch.randn(m, n, dtype=torch.float64, generator=g)
    G = J @ J.T
    U = torch.rand(4, m, dtype=torch.float64, generator=g)
    V = solve_lower_bounded_qp(G, U)
    assert (V >= U).all()  # feasibility is exact, never approximate
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= KKT_TOL[torch.float64]


def test_unconflicted_rows_are_returned_unchanged():
    """When ``G u ≥ 0``, ``v = u`` is optimal and must come back exactly."""
    J = torch.rand(5, 7, dtype=torch.float64)  # non-negative entries: no conflict at all
    G = J @ J.T
    U = torch.eye(5, dtype=torch.float64) / 5
    assert torch.equal(solve_lower_bounded_qp(G, U), U)


def test_zero_gramian_gives_the_lower_bound():
    U = torch.rand(3, 4)
    assert torch.equal(solve_lower_bounded_qp(torch.zeros(4, 4), U), U)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("m", [3, 80])
def test_non_finite_gramian_gives_nan_rows(bad: float, m: int):
    J = torch.randn(m, m)
    G = J @ J.T
    G[0, 1] = G[1, 0] = bad
    V = solve_lower_bounded_qp(G, torch.eye(m) / m)
    assert V.isnan().all()


def test_non_finite_lower_bound_gives_nan_row_only():
    J = torch.randn(4, 4)
    U = torch.eye(4) / 4
    U[2, 0] = float("nan")
    V = solve_lower_bounded_qp(J @ J.T, U)
    assert V[2].isnan().all()
    assert not V[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_solved_in_float32(dtype: torch.dtype):
    J = torch.randn(6, 10)
    G = regularised_gramian(J.double())
    U = torch.eye(6) / 6
    V = solve_lower_bounded_qp(G.to(dtype), U.to(dtype))
    assert V.dtype == dtype
    reference = solve_lower_bounded_qp(G.to(dtype).float(), U)
    torch.testing.assert_close(V, reference.to(dtype))


def test_no_problem():
    assert solve_lower_bounded_qp(torch.eye(3), torch.zeros(0, 3)).shape == (0, 3)
