"""The default mode's pivoting up to ``m = 64``: block steps with each face solved on its smaller
side (:mod:`torchjd.linalg._small_pivoting`) and single pivots on the whole tableau
(:mod:`torchjd.linalg._tableau_pivoting`, ``m ≤ 24``), against quadprog (Goldfarb-Idnani's dual
method, an independent algorithm) and the KKT conditions."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchjd.linalg._bounded_qp as bounded_qp
from tests.linalg.test_principal_pivoting import low_rank_gramian
from tests.reference.dual_cone import kkt_violation, with_quadprog
from tests.reference.matrices import make
from torchjd.linalg import TorchProjector
from torchjd.linalg._bounded_qp import solve_lower_bounded_qp
from torchjd.linalg._small_pivoting import _Faces, small_pivoting
from torchjd.linalg._tableau_pivoting import TABLEAU_MAX_M, tableau_pivoting


def regularised(J: torch.Tensor) -> torch.Tensor:
    """The default mode's Gramian: ``J Jᵀ`` divided by its trace, plus ``1e-4 I``."""
    G = J @ J.T
    return G / G.trace() + 1e-4 * torch.eye(J.shape[0], dtype=J.dtype)


def gramians(m: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(m)
    shared = 0.3 * torch.randn(1, 4 * m, generator=g, dtype=torch.float64)
    per_sample = shared + torch.randn(m, 4 * m, generator=g, dtype=torch.float64)
    return {
        "low_rank": low_rank_gramian(m, m),
        "normal": regularised(make("normal", m, m, seed=m)),
        "mixed_row_norms": regularised(make("mixed_row_norms", m, 2 * m, seed=m)),
        "per_sample": regularised(per_sample),
    }


def problems(m: int) -> torch.Tensor:
    """UPGrad's rows, and rows with negative entries (where ``v = 0`` can be optimal)."""
    g = torch.Generator().manual_seed(m)
    return torch.cat([torch.eye(m, dtype=torch.float64) / m, torch.randn(4, m, generator=g)])


def random_problem(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A default-mode Gramian of a standard normal ``J`` (``[m, n]``) whose row norms spread over
    four decades, and :func:`problems`."""
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=generator, dtype=torch.float64)
    norms = torch.logspace(-2, 2, m, dtype=torch.float64)[torch.randperm(m, generator=generator)]
    return regularised(J * norms.unsqueeze(1)), problems(m)


def assert_optimal(G: torch.Tensor, U: torch.Tensor, X: torch.Tensor, atol: float) -> None:
    expected = with_quadprog(G.double().numpy(), U.double().numpy())
    scale = U.double().abs().amax(dim=1, keepdim=True).numpy()
    np.testing.assert_allclose(X.double().numpy() / scale, expected / scale, rtol=0, atol=atol)
    for u, x in zip(U.double().numpy(), X.double().numpy(), strict=True):
        assert kkt_violation(G.double().numpy(), u, x) <= atol


@pytest.mark.parametrize("m", [9, 16, 33, 64])
@pytest.mark.parametrize("family", ["low_rank", "normal", "mixed_row_norms", "per_sample"])
def test_matches_quadprog(m: int, family: str):
    G = gramians(m)[family]
    U = problems(m)
    result = small_pivoting(G, U, U @ G > 0, 1e-7, 3 * m + 10)
    assert result is not None
    X, converged = result
    assert converged.all()
    assert (X >= U).all()
    assert_optimal(G, U, X, 1e-7)


@given(m=st.integers(9, 24), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_matches_quadprog_on_random_problems(m: int, n: int, seed: int):
    G, U = random_problem(m, n, seed)
    X, converged = small_pivoting(G, U, U @ G > 0, 1e-7, 3 * m + 10)
    assert converged.all()
    assert_optimal(G, U, X, 1e-7)


@pytest.mark.parametrize("guess", ["empty", "full", "random"])
def test_any_initial_guess_reaches_the_optimum(guess: str):
    m = 20
    G, U = gramians(m)["low_rank"], problems(m)
    if guess == "random":
        active = torch.rand(U.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    else:
        active = torch.full(U.shape, guess == "full")
    X, converged = small_pivoting(G, U, active, 1e-7, 3 * m + 10)
    assert converged.all()
    assert_optimal(G, U, X, 1e-7)


def test_stopped_early_rows_say_so():
    m = 32
    G, U = gramians(m)["low_rank"], problems(m)
    X, converged = small_pivoting(G, U, U @ G > 0, 1e-7, 1)
    assert not converged.all()
    assert (X >= U).all()
    for u, x, ok in zip(U.numpy(), X.numpy(), converged.tolist(), strict=True):
        if ok:
            assert kkt_violation(G.numpy(), u, x) <= 1e-7


@given(m=st.integers(1, 64), data=st.data())
def test_face_widths_match_their_definition(m: int, data: st.DataObject):
    """The widths that size the face solves, against their definition: the most and the fewest
    active indices of a row and (from ``m = 33``) the widest of the rows' smaller sides,
    ``max_i min(s_i, m − s_i)``."""
    sizes = data.draw(st.lists(st.integers(0, m), min_size=1, max_size=80))
    n_active = [float(size) for size in sizes]
    faces = _Faces(torch.eye(m, dtype=torch.float64), torch.eye(m, dtype=torch.float64))
    expected = [max(sizes), min(sizes)]
    if m >= 33:
        expected.append(max(min(size, m - size) for size in sizes))
    assert faces.widths(n_active) == expected


def test_refuses_ill_conditioned_and_non_finite_gramians():
    m = 12
    G, U = gramians(m)["normal"], problems(m)
    duplicate = G.clone()
    duplicate[1], duplicate[:, 1] = duplicate[0], duplicate[:, 0]  # singular
    assert small_pivoting(duplicate, U, U @ duplicate > 0, 1e-7, 50) is None
    G[2, 3] = G[3, 2] = torch.nan
    assert small_pivoting(G, U, U @ G > 0, 1e-7, 50) is None


def test_non_finite_rows_stop_unconverged():
    m = 12
    G, U = gramians(m)["normal"], problems(m)
    U[3, 5] = torch.nan
    _, converged = small_pivoting(G, U, U @ G > 0, 1e-7, 50)
    assert converged.tolist() == [i != 3 for i in range(U.shape[0])]


@pytest.mark.parametrize("m", [9, 16, 40, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solver_uses_it_and_hands_over_the_rows_it_leaves(
    m: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
):
    """The default mode's solver runs it (the tableau variant up to ``m = 24``) on every row;
    rows it leaves (here: every other row, as if stopped early) are solved by the general
    route."""
    name = "tableau_pivoting" if m <= TABLEAU_MAX_M else "small_pivoting"
    method = getattr(bounded_qp, name)
    calls = []

    def spy(G, U, *args):
        calls.append(G.shape[0])
        X, converged = method(G, U, *args)
        return X, converged & (torch.arange(U.shape[0]) % 2 == 0)

    monkeypatch.setattr(bounded_qp, name, spy)
    G, U = gramians(m)["mixed_row_norms"], problems(m)
    V = solve_lower_bounded_qp(G.to(dtype), U.to(dtype))
    assert calls == [m]
    assert V.dtype == dtype
    assert_optimal(G, U, V, 1e-4 if dtype == torch.float32 else 1e-7)


def test_solver_falls_back_when_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(bounded_qp, "small_pivoting", lambda *args: None)
    m = 20
    G, U = gramians(m)["normal"], problems(m)
    assert_optimal(G, U, solve_lower_bounded_qp(G, U), 1e-7)


def test_solver_gives_nan_rows_for_non_finite_inputs():
    m = 16
    G, U = gramians(m)["normal"], problems(m)
    U[2, 0] = torch.inf
    V = solve_lower_bounded_qp(G, U)
    assert V[2].isnan().all()
    rows = [i for i in range(U.shape[0]) if i != 2]
    assert_optimal(G, U[rows], V[rows], 1e-7)
    G[0, 0] = torch.nan
    assert solve_lower_bounded_qp(G, U).isnan().all()


@pytest.mark.parametrize("m", [2, 9, 12, 16])
@pytest.mark.parametrize("family", ["low_rank", "normal", "mixed_row_norms", "per_sample"])
def test_tableau_matches_quadprog(m: int, family: str):
    G, U = gramians(m)[family], problems(m)
    X, converged = tableau_pivoting(G, U, 1e-7, 3 * m + 10)
    assert converged.all()
    assert (X >= U).all()
    assert_optimal(G, U, X, 1e-7)


@given(m=st.integers(2, 16), n=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_tableau_matches_quadprog_on_random_problems(m: int, n: int, seed: int):
    G, U = random_problem(m, n, seed)
    X, converged = tableau_pivoting(G, U, 1e-7, 3 * m + 10)
    assert converged.all()
    assert_optimal(G, U, X, 1e-7)


def test_tableau_rows_stopped_early_or_not_finite_say_so():
    m = 16
    G, U = gramians(m)["low_rank"], problems(m)
    X, converged = tableau_pivoting(G, U, 1e-7, 1)
    assert not converged.all()
    for u, x, ok in zip(U.numpy(), X.numpy(), converged.tolist(), strict=True):
        if ok:
            assert kkt_violation(G.numpy(), u, x) <= 1e-7
    U[3, 5] = torch.nan
    _, converged = tableau_pivoting(G, U, 1e-7, 3 * m + 10)
    assert converged.tolist() == [i != 3 for i in range(U.shape[0])]
    G[0, 0] = 0.0  # not positive definite: no row is solved
    assert not tableau_pivoting(G, U, 1e-7, 3 * m + 10)[1].any()


@pytest.mark.parametrize("m", [4, 12, 40, 100])
@pytest.mark.parametrize("reg_eps", [1e-4, 0.0])
def test_no_rows(m: int, reg_eps: float):
    J = torch.randn(m, m, generator=torch.Generator().manual_seed(m))
    V = TorchProjector(norm_eps=reg_eps, reg_eps=reg_eps)(torch.zeros(0, m), J @ J.T)
    assert V.shape == (0, m)
