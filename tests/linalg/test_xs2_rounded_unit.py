"""The exact mode's rows of the unit vectors on a singular float32 Gramian up to ``m = 16``
(``_bounded_qp._rounded_unit_least_norm``): the faces of the regularised ``G`` from the default
mode's batched unit route, refined towards ``G``, against the general least-norm route
(``_least_norm_route``, which these rows took before); the rows that the unit route leaves take
the least-norm route."""

import pytest
import torch

from tests.reference.matrices import make
from torchjd.linalg import _bounded_qp
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, tikhonov

FAMILIES = {
    "rank_deficient": lambda m, seed: make("rank_deficient", m, 4 * m, seed=seed),
    "more_rows": lambda m, seed: make("normal", m, m // 2, seed=seed),
    "duplicate_rows": lambda m, seed: make("duplicate_rows", m, 4 * m, seed=seed),
    "zero_row": lambda m, seed: make("zero_row", m, 4 * m, seed=seed),
}
TOL = LEAST_NORM_TOL[torch.float32]


def gramian(J: torch.Tensor) -> torch.Tensor:
    """The float32 Gramian of ``J``, normalised by its trace."""
    J = J.float()
    G = J @ J.T
    return G / G.trace()


def unit_rows(G: torch.Tensor) -> torch.Tensor:
    return _bounded_qp._exact_unit_route(G, TOL, 10_000)


def least_norm_rows(G: torch.Tensor) -> torch.Tensor:
    """The rows of the general least-norm route (every unit vector, conflicted or not)."""
    eye = torch.eye(G.shape[0])
    G_regularised = tikhonov(G)
    X = _bounded_qp._least_norm_route(G_regularised, G, eye, G_regularised, TOL, 10_000)
    return torch.maximum(X, eye)


def update_error(J: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> float:
    """``max_i ‖(X_i − Y_i) J‖ / max_j ‖J_j‖`` in float64: the difference of the updates, relative
    to the largest row (as the non-conflict guarantee is)."""
    J = J.double()
    return float(((X.double() - Y.double()) @ J).norm(dim=1).max() / J.norm(dim=1).max())


def energies(G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``Σ_j G_jj v_j²`` of each row, in float64."""
    return (X.double() ** 2 * G.double().diagonal()).sum(dim=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("m", [9, 12, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_least_norm_route(
    monkeypatch: pytest.MonkeyPatch, family: str, m: int, seed: int
) -> None:
    """The route runs (the unit route once, on the regularised ``G``), and its rows give the
    updates of the least-norm route, with weights no heavier; the
    update of their mean does not conflict with any row of ``J``."""
    J = FAMILIES[family](m, seed)
    G = gramian(J)
    calls = []
    original = _bounded_qp._small_unit_route

    def spy(G_arg: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(G_arg)
        return original(G_arg, tol)

    monkeypatch.setattr(_bounded_qp, "_small_unit_route", spy)
    X = unit_rows(G)
    monkeypatch.undo()
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], tikhonov(G))
    Y = least_norm_rows(G)
    assert X.dtype == torch.float32
    assert not X.isnan().any()
    assert (torch.eye(m) <= X).all()
    assert update_error(J, X, Y) <= 1e-4
    assert (energies(G, X) <= energies(G, Y) * (1 + 1e-4) + 1e-12).all()
    d = X.double().mean(dim=0) @ J.double()
    norms = J.double().norm(dim=1)
    assert float(((J.double() @ d) / (norms * norms.max()).clamp_min(1e-300)).min()) >= -1e-4


def test_rows_left_take_least_norm_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows that the unit route does not solve are those of the least-norm route."""
    J = FAMILIES["rank_deficient"](16, 5)
    G = gramian(J)
    original = _bounded_qp._small_unit_route
    left = torch.tensor([1, 4, 9])

    def partial(G_arg: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
        X, solved = original(G_arg, tol)
        X[left] = 123.0  # (overwritten by the least-norm route)
        solved = solved.clone()
        solved[left] = False
        return X, solved

    monkeypatch.setattr(_bounded_qp, "_small_unit_route", partial)
    X = unit_rows(G)
    monkeypatch.undo()
    Y = least_norm_rows(G)
    assert not (X == 123.0).any()
    assert update_error(J, X[left], Y[left]) <= 1e-4
    conflicted = G.amin(dim=1) < 0
    assert conflicted[left].all()
