"""UPGrad's problems (those of the unit vectors) by dense dual steps
(:func:`~torchjd.linalg._small_pivoting.unit_dense_pivoting`, ``m ≤ 24``) and by block pivoting
from a sharper guess with dense later steps
(:func:`~torchjd.linalg._small_pivoting.unit_small_pivoting`, ``m > 24``), against quadprog
(Goldfarb-Idnani's dual method, an independent algorithm) and the KKT conditions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchjd.linalg._bounded_qp as bounded_qp
import torchjd.linalg._small_pivoting as small_pivoting_module
from tests.linalg.test_small_pivoting import gramians, random_problem, regularised
from tests.linalg.test_unit_groups import brute_force_groups
from tests.linalg.test_unit_rows import assert_unit_rows_optimal
from tests.reference.aggregators import upgrad_weights
from tests.reference.dual_cone import with_quadprog
from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import TorchProjector
from torchjd.linalg._bounded_qp import _small_unit_route
from torchjd.linalg._small_pivoting import (
    UnitRows,
    _conditioned,
    _dense_steps,
    _descent_guess,
    _Faces,
    _pivoting,
    unit_dense_pivoting,
    unit_small_pivoting,
)


def classifier_jacobian(m: int, seed: int, classes: int = 10, n: int = 200) -> torch.Tensor:
    """Per-sample gradients of a classifier, roughly: each row is its class's direction (the
    classes' directions orthonormal, then centred: those of two classes conflict) plus a little
    noise. The rows of a class agree, those of different classes conflict."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(n, classes, generator=g, dtype=torch.float64))[0].T
    directions = directions - directions.mean(dim=0)
    labels = torch.arange(m) % classes
    noise = torch.randn(m, n, generator=g, dtype=torch.float64)
    return directions[labels] + 0.3 / n**0.5 * noise


def classifier_gramian(m: int, seed: int) -> torch.Tensor:
    return regularised(classifier_jacobian(m, seed))


def dense_solution(G: torch.Tensor, active: torch.Tensor, max_steps: int):
    """:func:`_dense_steps` on the unit vectors' problems of ``G`` from ``active``: the rows
    ``v = z / √G_jj`` (clamped to ``v ≥ e_i``, as the final check does), the faces left and the
    count of steps."""
    problem = UnitRows(G, 1e-7)
    H = torch.linalg.inv(problem.G_hat)
    lower = problem.U_hat - problem.primal_bound
    Z, faces, steps = _dense_steps(H, problem.U_hat, active, lower, problem.dual_bound, max_steps)
    return torch.maximum(Z, problem.U_hat) / problem.root, faces, steps


@pytest.mark.parametrize("m", [2, 9, 16, 24, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_steps_from_the_optimal_faces_stop_at_once(m: int, seed: int):
    """From the optimal active sets (those of quadprog's rows), one dense step is feasible
    everywhere and gives the optimal rows."""
    G = classifier_gramian(m, seed) if seed else gramians(max(m, 9))["per_sample"][:m, :m]
    X_ref, solved = _small_unit_route(G, 1e-7)
    assert solved.all()
    optimal_faces = X_ref <= torch.eye(m, dtype=torch.float64) + 1e-12
    X, faces, steps = dense_solution(G, optimal_faces, 1)
    assert faces is None
    assert steps == 1
    assert_unit_rows_optimal(G, X, torch.ones(m, dtype=torch.bool))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 24), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_dense_steps_from_any_guess_are_optimal_when_they_stop(m: int, n: int, seed: int):
    """From a random guess (holding each row's own index), when every row is feasible the rows are
    optimal (quadprog, KKT); on these sizes that happens within a few dozen full exchanges on most
    problems."""
    G, _ = random_problem(m, n, seed)
    g = torch.Generator().manual_seed(seed)
    guess = (torch.rand(m, m, generator=g) < 0.5) | torch.eye(m, dtype=torch.bool)
    X, faces, steps = dense_solution(G, guess, 40)
    if faces is None:
        assert 1 <= steps <= 40
        assert_unit_rows_optimal(G, X, torch.ones(m, dtype=torch.bool))


@pytest.mark.parametrize("m", [9, 16, 24])
@pytest.mark.parametrize("seed", range(5))
def test_dense_route_solves_classifier_gramians_in_few_steps(m: int, seed: int):
    """The route of ``m ≤ 24`` on per-sample Gramians of a classifier: no more than
    :data:`_DENSE_MAX_STEPS` steps, every row solved and optimal."""
    G = classifier_gramian(m, seed)
    result = unit_dense_pivoting(UnitRows(G, 1e-7), small_pivoting_module._DENSE_MAX_STEPS)
    assert result is not None
    X, solved = result
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)


def test_dense_route_declines_ill_conditioned_gramians():
    """Duplicate rows (a zero pivot up to the regularisation): ``H`` is not accurate enough, the
    dense route declines, and the unit route still solves every row (single pivots)."""
    J = torch.randn(16, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    J[5] = J[3]
    G = (J @ J.T) / (J @ J.T).trace() + 1e-9 * torch.eye(16, dtype=torch.float64)
    assert unit_dense_pivoting(UnitRows(G, 1e-7), 10) is None
    X, solved = _small_unit_route(G, 1e-7)
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)


def test_dense_route_declines_when_out_of_steps(monkeypatch: pytest.MonkeyPatch):
    """Out of steps, the dense route declines, and the unit route still solves every row, by
    single pivots on the tableau."""
    G = classifier_gramian(16, 0)
    assert unit_dense_pivoting(UnitRows(G, 1e-7), 1) is None  # this guess needs two steps
    calls = []
    tableau = bounded_qp.scaled_tableau_pivoting

    def spy(*args):
        calls.append(1)
        return tableau(*args)

    monkeypatch.setattr(bounded_qp, "_DENSE_MAX_STEPS", 1)
    monkeypatch.setattr(bounded_qp, "scaled_tableau_pivoting", spy)
    X, solved = _small_unit_route(G, 1e-7)
    assert calls == [1]
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)


def test_dense_route_rows_of_non_finite_gramians_are_unsolved():
    G = classifier_gramian(16, 0)
    G[2, 7] = G[7, 2] = torch.nan
    _, solved = _small_unit_route(G, 1e-7)
    assert not solved.any()


def sharper_guess(G: torch.Tensor) -> torch.Tensor:
    """``{i} ∪ {j : G_ij > 0, (G⁻¹)_ij < 0}`` (Jacobi scaling changes neither sign)."""
    eye = torch.eye(G.shape[0], dtype=torch.bool)
    return (G > 0) & (torch.linalg.inv(G) < 0) | eye


def first_guesses(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The active sets of each face solve by blocks, from now on; a face solve at once, on faces
    that partition the indices, is recorded as the guess it was grouped from (its groups
    checked against brute force)."""
    guesses = []
    solve = small_pivoting_module._Faces.solve
    groups = small_pivoting_module._groups

    def spy(self, U_hat, active, widths):
        guesses.append(active.clone())
        return solve(self, U_hat, active, widths)

    def spy_groups(active):
        result = groups(active)
        expected, partition = brute_force_groups(active.numpy())
        assert np.array_equal(result[0].numpy(), expected)
        if partition:
            guesses.append(active.clone())
        return result

    monkeypatch.setattr(small_pivoting_module._Faces, "solve", spy)
    monkeypatch.setattr(small_pivoting_module, "_groups", spy_groups)
    return guesses


@pytest.mark.parametrize("m", [25, 32, 48, 64])
@pytest.mark.parametrize("seed", range(4))
def test_small_faces_take_the_sharper_guess(m: int, seed: int, monkeypatch: pytest.MonkeyPatch):
    """Per-sample Gramians of a classifier beyond ``m = 24``: the initial faces
    ``{j : G_ij > 0}`` are small, the first step starts from the sharper guess, and the rows
    are optimal."""
    guesses = first_guesses(monkeypatch)
    G = classifier_gramian(m, seed)
    assert (G > 0).sum(dim=1).max() <= m / 3
    X, solved = _small_unit_route(G, 1e-7)
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)
    assert torch.equal(guesses[0], sharper_guess(G))


def test_the_sharper_guess_drops_agreeing_indices_that_the_own_face_pushes_up(
    monkeypatch: pytest.MonkeyPatch,
):
    """Triples of rows ``a, b, c`` where ``c`` agrees strongly with ``a`` and ``b``, which agree
    weakly: ``G_ab > 0`` but ``(G⁻¹)_ab > 0``, so that ``b`` leaves the guess of ``a``. The rows
    are still optimal."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(60, 20, generator=g, dtype=torch.float64))[0].T
    rows = []
    for e1, e2 in zip(basis[0::2], basis[1::2], strict=True):
        rows += [e1 + 0.1 * e2, e2 + 0.1 * e1, (e1 + e2) / 2**0.5]
    J = torch.stack(rows)
    J = J - 0.5 * J.mean(dim=0)  # rows of different triples conflict
    G = regularised(J + 0.01 * torch.randn(J.shape, generator=g, dtype=torch.float64))
    guesses = first_guesses(monkeypatch)
    X, solved = _small_unit_route(G, 1e-7)
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)
    assert torch.equal(guesses[0], sharper_guess(G))
    assert guesses[0].sum() < (G > 0).sum()


def test_large_faces_keep_the_plain_guess(monkeypatch: pytest.MonkeyPatch):
    """Rows with a strong common direction: the faces ``{j : G_ij > 0}`` are large, and the first
    step starts from them."""
    guesses = first_guesses(monkeypatch)
    G = gramians(40)["per_sample"]
    assert (G > 0).sum(dim=1).max() > 40 / 3
    _, solved = _small_unit_route(G, 1e-7)
    assert solved.all()
    assert torch.equal(guesses[0], G > 0)


@pytest.mark.parametrize("budget", [0, 64 * 64**3])
@pytest.mark.parametrize("dense_steps", [1, 3])
@pytest.mark.parametrize("m", [25, 40, 64])
@pytest.mark.parametrize("family", ["normal", "mixed_row_norms", "per_sample", "classifier"])
def test_later_steps_dense_or_block_reach_the_optimum(
    budget: int, dense_steps: int, m: int, family: str, monkeypatch: pytest.MonkeyPatch
):
    """Whether the rows left after the first step take dense steps (all of them, with a large
    budget) or block steps (none), and however few dense steps they get before block steps take
    over, every row comes out optimal."""
    monkeypatch.setattr(small_pivoting_module, "_DENSE_BUDGET", budget)
    monkeypatch.setattr(small_pivoting_module, "_DENSE_STEPS", dense_steps)
    G = classifier_gramian(m, m) if family == "classifier" else gramians(m)[family]
    X, solved = _small_unit_route(G, 1e-7)
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)


def test_few_rows_left_take_dense_steps(monkeypatch: pytest.MonkeyPatch):
    """When the first guess is wrong for a few rows only, these take dense steps, and no block
    step follows."""
    dense_calls, block_calls = [], []
    dense = small_pivoting_module._dense_steps
    pivoting = small_pivoting_module._pivoting
    monkeypatch.setattr(
        small_pivoting_module,
        "_dense_steps",
        lambda H, U, *args: dense_calls.append(U.shape[0]) or dense(H, U, *args),
    )
    monkeypatch.setattr(
        small_pivoting_module,
        "_pivoting",
        lambda *args: block_calls.append(1) or pivoting(*args),
    )
    found = 0
    for seed in range(10):
        dense_calls.clear()
        block_calls.clear()
        G = classifier_gramian(32, seed)
        X, solved = _small_unit_route(G, 1e-7)
        assert solved.all()
        if dense_calls and not block_calls:
            found += 1
            assert 0 < dense_calls[0] * 32**3 <= small_pivoting_module._DENSE_BUDGET
            assert_unit_rows_optimal(G, X, solved)
    assert found >= 2


@settings(max_examples=20, deadline=None)
@given(m=st.integers(25, 64), n=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_pivoting_from_given_first_solutions_is_the_same(m: int, n: int, seed: int):
    """:func:`_pivoting` handed the first step's face solutions gives bitwise what it computes
    from the same guess."""
    G, _ = random_problem(m, n, seed)
    problem = UnitRows(G, 1e-7)
    L, info = torch.linalg.cholesky_ex(problem.G_hat)
    active = problem.G_hat > 0
    conditioned = _conditioned(L, info, active)
    if conditioned is None:
        return
    n_active = conditioned[1]
    faces = _Faces(problem.G_hat, L)
    first = faces.solve(problem.U_hat, active, faces.widths(n_active))
    X, solved = _pivoting(problem, faces, active, n_active, 3 * m + 10)
    X_first, solved_first = _pivoting(problem, faces, active, n_active, 3 * m + 10, first)
    assert torch.equal(X, X_first)
    assert torch.equal(solved, solved_first)


def test_unit_small_pivoting_declines_ill_conditioned_gramians():
    J = torch.randn(40, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    J[5] = J[3]
    G = (J @ J.T) / (J @ J.T).trace() + 1e-9 * torch.eye(40, dtype=torch.float64)
    assert unit_small_pivoting(UnitRows(G, 1e-7), 200) is None


@pytest.mark.parametrize("m", [12, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upgrad_weights_of_classifier_gramians(m: int, dtype: torch.dtype):
    """UPGrad's weights on per-sample Gramians of a classifier (the training use) match the primal
    reference, in float64 and float32."""
    J = classifier_jacobian(m, m)
    p = torch.linspace(0.0, 1.0, m, dtype=torch.float64)
    for pref in (None, p):
        expected = upgrad_weights(J.numpy(), None if pref is None else pref.numpy())
        G = (J @ J.T).to(dtype)
        weights = UPGradWeighting(None if pref is None else pref.to(dtype))(G)
        assert weights.dtype == dtype
        atol = 1e-6 if dtype == torch.float64 else 1e-4
        scale = np.abs(expected).max()
        np.testing.assert_allclose(weights.double().numpy() / scale, expected / scale, atol=atol)


@pytest.mark.parametrize("m", [16, 32])
def test_weights_of_a_gramian_that_requires_grad_differentiate_as_the_general_path(m: int):
    """Through the dense steps (``m ≤ 24``) or the sharper guess, the weights keep their graph, and
    their gradient is that of the projector's general path on the rows ``p_i e_i`` (single pivots
    on the tableau, block pivoting)."""
    J = classifier_jacobian(m, 0)
    p = torch.linspace(0.5, 1.0, m, dtype=torch.float64)
    gradients = []
    for weights_of in (
        lambda G: UPGradWeighting(p)(G),
        lambda G: TorchProjector()(torch.diag(p), G).sum(dim=0),
    ):
        G = (J @ J.T).requires_grad_()
        (weights_of(G) * torch.arange(m, dtype=torch.float64)).sum().backward()
        gradients.append(G.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("m", [25, 40, 64])
@pytest.mark.parametrize("family", ["normal", "per_sample"])
def test_descent_guess_from_the_optima_is_their_faces(m: int, family: str):
    """The optima (quadprog) are fixed points of projected gradient: from them, the guess is their
    active sets (where ``v_j = u_j``)."""
    G = gramians(m)[family]
    problem = UnitRows(G, 1e-7)
    optima = torch.from_numpy(with_quadprog(G.numpy(), np.eye(m)))
    faces = optima <= torch.eye(m, dtype=torch.float64) + 1e-9
    guess = _descent_guess(problem.G_hat, problem.U_hat, optima * problem.root, 20)
    assert torch.equal(guess, faces)


@pytest.mark.parametrize("m", [40, 64])
def test_rows_left_by_the_first_step_start_again_from_the_descent_guess(
    m: int, monkeypatch: pytest.MonkeyPatch
):
    """Standard normal Jacobians: the first step leaves most rows infeasible, the block steps
    start again from the descent guess, in fewer face solves than from the first step's faces,
    and the rows are optimal."""
    solves = []
    solve = small_pivoting_module._Faces.solve
    monkeypatch.setattr(
        small_pivoting_module._Faces,
        "solve",
        lambda self, *args: solves.append(1) or solve(self, *args),
    )
    G = gramians(m)["normal"]
    X, solved = _small_unit_route(G, 1e-7)
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)
    with_descent = len(solves)
    solves.clear()
    monkeypatch.setattr(small_pivoting_module, "_DESCENT_MAX_STEPS", 0)
    X_without, _ = _small_unit_route(G, 1e-7)
    assert len(solves) > with_descent
    torch.testing.assert_close(X, X_without, rtol=0, atol=1e-12)
