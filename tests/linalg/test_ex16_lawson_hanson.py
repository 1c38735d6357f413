"""The active-set method of :mod:`torchjd.linalg._lawson_hanson`: against the enumeration of every
active set, on small singular Gramians, from starts that free every index or none (the update
``Jᵀv`` of each row is the projection's, unique where the weights are not, and its KKT conditions
hold on ``G``); and its stop at a fixed point of its steps, where rounding makes a step back of
zero remove the index just added."""

import numpy as np
import pytest
import torch

from tests.reference.dual_cone import brute_force_singular, kkt_violation
from tests.reference.matrices import make
from torchjd.linalg import _lawson_hanson
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


def test_fixed_point_ends_the_steps(monkeypatch: pytest.MonkeyPatch):
    """A step whose step back of zero removes the index it added leaves the state it started
    from (forced here: the face solve puts a negative weight on that index whenever it is free,
    as rounding does on near-duplicate rows whose optimal weights are large). The method stops
    there, with the rows (bit for bit) of its full count of steps, which repeat that step."""
    J = make("normal", 8, 3, seed=0)
    G = J @ J.T
    U = -torch.ones(1, 8, dtype=torch.float64)
    U[0, 0] = 1.0
    faces = []
    block, face_solve = _lawson_hanson._block, _lawson_hanson._face_solve

    def recorded(G: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        faces.append(P.clone())
        return block(G, P)

    monkeypatch.setattr(_lawson_hanson, "_block", recorded)
    lawson_hanson_rows(G, U, U, 3 * 8 + 10)
    assert len(faces) >= 2  # (two indices entered, one at a time)
    assert len(faces[1]) == 2
    k = int(faces[1][~torch.isin(faces[1], faces[0])][0])  # the second to enter

    def forced(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(faces[-1] == k, -1.0, face_solve(A, b))

    monkeypatch.setattr(_lawson_hanson, "_face_solve", forced)
    faces.clear()
    X = lawson_hanson_rows(G, U, U, 3 * 8 + 10)
    with_fixed_point = len(faces)
    faces.clear()
    monkeypatch.setattr(torch, "equal", lambda a, b: False)  # (no state is ever found again)
    X_all_steps = lawson_hanson_rows(G, U, U, 3 * 8 + 10)
    assert bool((X_all_steps == X).all())
    assert with_fixed_point <= 4 < 3 * 8 <= len(faces)
