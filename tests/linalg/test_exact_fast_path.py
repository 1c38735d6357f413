"""The exact mode's route for nonsingular Gramians: the default mode's machinery on ``G`` itself.

When ``G`` is nonsingular, ``argmin_{v ≥ u} vᵀ G v`` is unique, so the least-norm requirement of
the exact mode is void; ``_bounded_qp._nonsingular`` decides, ``_nonsingular_route`` solves.
"""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from tests.reference.dual_cone import brute_force, kkt_violation
from tests.reference.matrices import make
from torchjd.aggregation import UPGrad
from torchjd.linalg import TorchProjector, _bounded_qp

NON_CONFLICT = {torch.float64: 1e-8, torch.float32: 1e-4}
# (UPGrad's unit vectors up to m = 64 take the default mode's unit route first, then
# _nonsingular_route for the rows it leaves)
ROUTES = ("_nonsingular_route", "_least_norm_route", "_small_unit_route")


def exact() -> TorchProjector:
    return TorchProjector(norm_eps=0.0, reg_eps=0.0)


@pytest.fixture
def routes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many times each route of the exact mode ran (the least-norm one also counts the rows
    that the fast route hands over)."""
    calls = dict.fromkeys(ROUTES, 0)

    def spy(name: str) -> Callable:
        original = getattr(_bounded_qp, name)

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapped

    for name in ROUTES:
        monkeypatch.setattr(_bounded_qp, name, spy(name))
    return calls


def worst_conflict(J: torch.Tensor, d: torch.Tensor) -> float:
    """``min_i J_i · d / (‖J_i‖ max_j ‖J_j‖)``, in float64."""
    J, d = J.double(), d.double()
    norms = J.norm(dim=1)
    return float(((J @ d) / (norms * norms.max()).clamp_min(1e-300)).min())


def shared_direction(m: int, n: int, seed: int) -> torch.Tensor:
    """A weak common direction: few conflicts, but some."""
    return make("normal", m, n, seed=seed) + 0.3 * make("normal", 1, n, seed=seed + 1)


def near_duplicate(m: int, n: int, seed: int) -> torch.Tensor:
    J = make("normal", m, n, seed=seed)
    J[: m // 4] = J[m // 4 : m // 2] + 1e-6 * J[: m // 4]
    return J


WELL_CONDITIONED = {
    "normal": lambda m, seed: make("normal", m, 4 * m, seed=seed),
    "common_direction": lambda m, seed: shared_direction(m, 4 * m, seed),
    "mixed_row_norms": lambda m, seed: make("mixed_row_norms", m, 4 * m, seed=seed),
}
SINGULAR = {
    "rank_deficient": lambda m, seed: make("rank_deficient", m, 4 * m, seed=seed),
    "more_rows": lambda m, seed: make("normal", m, m // 2, seed=seed),
    "duplicate_rows": lambda m, seed: make("duplicate_rows", m, 4 * m, seed=seed),
    "zero_row": lambda m, seed: make("zero_row", m, 4 * m, seed=seed),
    "near_duplicate": lambda m, seed: near_duplicate(m, 4 * m, seed),
}


@pytest.mark.parametrize("family", sorted(WELL_CONDITIONED) + sorted(SINGULAR))
@pytest.mark.parametrize("m", [8, 40, 80])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_route_taken(routes: dict[str, int], family: str, m: int, dtype: torch.dtype):
    """Nonsingular Gramians take the fast route (once, for all rows); singular and near-singular
    ones (rank deficiency, more rows than columns, duplicate, zero and near-duplicate rows) the
    least-norm route only. Either way, the update never conflicts."""
    nonsingular = family in WELL_CONDITIONED
    J = (WELL_CONDITIONED if nonsingular else SINGULAR)[family](m, m).to(dtype)
    d = UPGrad(projector=exact())(J)
    # (singular float32 up to m = 16: the faces of the regularised G from the unit route first,
    # the rows it leaves by the least-norm route)
    rounded = not nonsingular and dtype == torch.float32 and m <= 16
    if m <= 64:
        assert routes["_small_unit_route"] == int(nonsingular or rounded)
        assert routes["_nonsingular_route"] <= int(nonsingular)
    else:
        # (zero rows beyond m = 64: the nonsingular route on the other rows, _paired_route)
        assert routes["_nonsingular_route"] == int(nonsingular or family == "zero_row")
    if rounded:
        assert routes["_least_norm_route"] <= 1
    elif not nonsingular:
        assert routes["_least_norm_route"] == 1
    assert worst_conflict(J, d) >= -NON_CONFLICT[dtype]


@pytest.mark.parametrize("family", sorted(WELL_CONDITIONED))
@pytest.mark.parametrize("m", [3, 6, 8])
def test_fast_route_against_brute_force(routes: dict[str, int], family: str, m: int):
    """Against enumeration of the active sets: the optimum of a positive definite ``G`` is
    unique, so the weights themselves must match."""
    J = WELL_CONDITIONED[family](m, m + 1)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    V = exact()(U, G).numpy()
    assert routes["_nonsingular_route"] == 1
    for u, v in zip(U.numpy(), V, strict=True):
        expected = brute_force(G.numpy(), u)
        assert kkt_violation(G.numpy(), u, v) <= 1e-9
        np.testing.assert_allclose(v, expected, rtol=1e-7, atol=1e-7 * np.abs(expected).max())


@pytest.mark.parametrize("family", sorted(WELL_CONDITIONED))
@pytest.mark.parametrize("m", [40, 100])
def test_fast_route_matches_the_least_norm_route(
    monkeypatch: pytest.MonkeyPatch, family: str, m: int
):
    """Beyond brute force: KKT conditions met on ``G`` itself, checked by an independent
    reference (they determine the unique optimum), and the same updates as the least-norm route
    (forced by declaring every Gramian singular); the same weights too, except where row norms
    spread over six decades (the weights of the small rows are then determined only to about
    ``κ · tol``)."""
    J = WELL_CONDITIONED[family](m, m + 2)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    fast = exact()(U, G)
    monkeypatch.setattr(_bounded_qp, "_nonsingular", lambda G: False)
    reference = exact()(U, G)
    for u, v in zip(U.numpy(), fast.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= 1e-9
    updates = ((fast - reference) @ J).norm(dim=1) / J.norm(dim=1).max()
    assert updates.max() <= 1e-7
    if family != "mixed_row_norms":
        scale = reference.abs().amax(dim=1, keepdim=True)
        assert ((fast - reference).abs() / scale).max() <= 1e-7


@pytest.mark.parametrize("family", sorted(WELL_CONDITIONED))
@pytest.mark.parametrize("m", [6, 20, 40])
def test_small_nonsingular_problems_take_the_batched_small_routes(
    monkeypatch: pytest.MonkeyPatch, family: str, m: int
):
    """Up to ``m = 64``, a nonsingular Gramian's rows are settled by the default mode's batched
    small routes (checked on ``G`` with the exact tolerance), without the general default route;
    the answer meets the KKT conditions on ``G`` (independent check)."""

    def general_route(*args: object) -> None:
        raise AssertionError("the general default route ran")

    monkeypatch.setattr(_bounded_qp, "_default_route", general_route)
    J = WELL_CONDITIONED[family](m, m + 2)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    V = exact()(U, G)
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= 1e-9


def test_rows_failing_the_check_go_to_the_least_norm_route(
    routes: dict[str, int], monkeypatch: pytest.MonkeyPatch
):
    """Default routes that leave the rows unsolved (here: return ``u``) hand them over."""
    monkeypatch.setattr(_bounded_qp, "_default_route", lambda G, U, *args: U.clone())
    monkeypatch.setattr(
        _bounded_qp,
        "_small_default_route",
        lambda G, U, tol: (U.clone(), torch.zeros(U.shape[0], dtype=torch.bool)),
    )
    J = make("normal", 20, 60, seed=1)
    G = J @ J.T
    U = torch.eye(20, dtype=torch.float64)
    V = exact()(U, G)
    assert routes["_nonsingular_route"] == 1
    assert routes["_least_norm_route"] == 1
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= 1e-9


@pytest.mark.parametrize(
    ("family", "expected"),
    [("normal", True), ("mixed_row_norms", True), ("rank_deficient", False)],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonsingular_decision(family: str, expected: bool, dtype: torch.dtype):
    J = make(family, 30, 90, seed=3).to(dtype)
    assert _bounded_qp._nonsingular(J @ J.T) is expected
    J[:5] = J[5:10] * (1 + 1e-7)  # near-duplicate rows
    assert _bounded_qp._nonsingular(J @ J.T) is False


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("normal", [torch.float32, torch.float64]),
        ("mixed_row_norms", [torch.float64]),  # a diagonal spread over 12 decades
    ],
)
def test_float32_rows_left_by_admm_run_again_in_float64(
    monkeypatch: pytest.MonkeyPatch, family: str, expected: list[torch.dtype]
):
    """With ADMM stopped after one iteration in float32, the rows it leaves are solved in
    float64 (not by the least-norm route), to the exact mode's float32 non-conflict; a Gramian
    with a widely spread diagonal is solved in float64 from the start."""
    dtypes = []
    default_route = _bounded_qp._default_route

    def spy(G: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dtypes.append(G.dtype)
        return default_route(G, *args, **kwargs)

    monkeypatch.setattr(_bounded_qp, "_default_route", spy)
    monkeypatch.setattr(_bounded_qp, "_FAST_FLOAT32_ITERS", 1)
    monkeypatch.setattr(_bounded_qp, "_SCHUR_BUDGET", {torch.float32: 0.0, torch.float64: 0.0})
    J = make(family, 80, 240, seed=5).float()
    d = UPGrad(projector=exact())(J)
    assert dtypes == expected
    assert worst_conflict(J, d) >= -NON_CONFLICT[torch.float32]
