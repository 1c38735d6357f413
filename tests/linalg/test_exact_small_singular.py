"""The exact mode on singular Gramians up to ``m = 32``, in float64: the default mode's masked
pivoting on the regularised Gramian, then the least-norm refinement until it settles
(``_bounded_qp._refined_least_norm``), against the general route (pivoting with the refinement of
every face, and its fallbacks) that it short-cuts."""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from tests.reference.dual_cone import kkt_violation
from tests.reference.matrices import make
from torchjd.linalg import TorchProjector, _bounded_qp


def exact() -> TorchProjector:
    return TorchProjector(norm_eps=0.0, reg_eps=0.0)


def more_rows(m: int, seed: int) -> torch.Tensor:
    return make("normal", m, m // 2, seed=seed)


def shared_direction(m: int, seed: int) -> torch.Tensor:
    """Few conflicts, in a Gramian of rank m / 4."""
    return make("rank_deficient", m, m // 4, seed=seed) + make("normal", 1, m // 4, seed=seed + 1)


SINGULAR: dict[str, Callable[[int, int], torch.Tensor]] = {
    "rank_deficient": lambda m, seed: make("rank_deficient", m, 4 * m, seed=seed),
    "more_rows": more_rows,
    "duplicate_rows": lambda m, seed: make("duplicate_rows", m, 4 * m, seed=seed),
    "zero_row": lambda m, seed: make("zero_row", m, 4 * m, seed=seed),
    "opposite_rows": lambda m, seed: make("opposite_rows", m, 4 * m, seed=seed),
    "shared_direction": shared_direction,
}


@pytest.mark.parametrize("family", sorted(SINGULAR))
@pytest.mark.parametrize("m", [16, 32])
def test_same_weights_as_the_general_route(family: str, m: int, monkeypatch: pytest.MonkeyPatch):
    """The rows it solves (it must solve some) have the weights of the general route, up to its
    rounding, and meet the KKT conditions on ``G``."""
    J = SINGULAR[family](m, m)
    G = J @ J.T
    assert not _bounded_qp._nonsingular(G / G.trace())
    U = torch.eye(m, dtype=torch.float64)
    original = _bounded_qp._refined_least_norm
    solved_rows = []

    def spy(*args, **kwargs):
        X, solved = original(*args, **kwargs)
        solved_rows.append(int(solved.sum()))
        return X, solved

    monkeypatch.setattr(_bounded_qp, "_refined_least_norm", spy)
    V = exact()(U, G)
    assert len(solved_rows) == 1
    assert solved_rows[0] > 0

    def unsolved(G, G_exact, U, GU, tol):
        return U.clone(), torch.zeros(U.shape[0], dtype=torch.bool)

    monkeypatch.setattr(_bounded_qp, "_refined_least_norm", unsolved)
    expected = exact()(U, G)
    scale = expected.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(V / scale, expected / scale, rtol=0.0, atol=1e-7)
    Gn = (G / G.trace()).numpy()
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(Gn, u, v) <= 1e-8
    np.testing.assert_array_less(-1e-12, (V - U).numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_not_taken_beyond_32_rows_nor_in_float32(dtype: torch.dtype, monkeypatch):
    """Beyond ``m = 32`` (where the masked face systems cost more than the general route) and on
    a float32 Gramian (whose rounding the least-norm refinement does not always meet the
    tolerance through), the general route runs alone."""
    calls = []
    monkeypatch.setattr(
        _bounded_qp, "_refined_least_norm", lambda *args: calls.append(args) or None
    )
    m = 40 if dtype == torch.float64 else 16
    J = make("duplicate_rows", m, 4 * m, seed=m).to(dtype)
    exact()(torch.eye(m, dtype=dtype), J @ J.T)
    assert calls == []
