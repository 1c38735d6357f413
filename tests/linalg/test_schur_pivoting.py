"""The default solver's paths for large problems against quadprog, the KKT conditions and the
other paths: pivoting with face solves through ``G⁻¹`` (well-conditioned Gramians with few
conflicts), float64 ADMM from a float32 state, and ADMM on the Jacobi-scaled problem."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.reference.dual_cone import kkt_violation, with_quadprog
from torchjd.linalg._admm import admm, warm_admm
from torchjd.linalg._bounded_qp import (
    _DIRECT_MAX_M,
    _LOPSIDED,
    _SCHUR_BUDGET,
    DEFAULT_TOL,
    _admm_from_float32,
    _admm_then_polish,
    _jacobi_scale,
    _times,
    solve_lower_bounded_qp,
)
from torchjd.linalg._kkt import row_scales
from torchjd.linalg._principal_pivoting import principal_pivoting, scaled_inverse
from torchjd.linalg._schur_pivoting import (
    _DISTINCT_MIN_ROWS,
    _MIN_PIVOT,
    distinct_faces,
    face_cost,
    schur_face_solver,
    schur_pivoting,
)


def regularised(J: torch.Tensor) -> torch.Tensor:
    G = J @ J.T
    return G / G.trace() + 1e-4 * torch.eye(len(G), dtype=G.dtype)


def per_sample_like(m: int, n: int, mean: float, seed: int) -> torch.Tensor:
    """Rows ``mean · g + noise`` with norms spread over two decades: few conflicts per row."""
    g = torch.Generator().manual_seed(seed)
    J = mean * torch.randn(1, n, generator=g, dtype=torch.float64)
    J = J + torch.randn(m, n, generator=g, dtype=torch.float64)
    norms = torch.logspace(-1, 1, m, dtype=torch.float64)[torch.randperm(m, generator=g)]
    return J * norms[:, None]


def last_layer(m: int, n_classes: int, seed: int) -> torch.Tensor:
    """Per-sample gradients of a cross-entropy loss w.r.t. a linear layer, ``(p_i − e_{y_i}) x_iᵀ``
    with non-negative features ``x_i``: rows of the same class agree, of other classes conflict (as
    in per-sample Gramians of real models early in training)."""
    g = torch.Generator().manual_seed(seed)
    logits = 0.3 * torch.randn(m, n_classes, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, dim=1)  # near uniform, as at initialisation
    y = torch.randint(0, n_classes, (m,), generator=g)
    delta = p - torch.nn.functional.one_hot(y, n_classes)
    x = torch.randn(m, 3 * m, generator=g, dtype=torch.float64).abs()
    return (delta.unsqueeze(2) * x.unsqueeze(1)).reshape(m, -1)


def problems(m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.eye(m, dtype=torch.float64) / m, torch.rand(3, m, generator=g)])


@given(
    m=st.integers(2, 40),
    n_per_m=st.integers(1, 6),
    mean=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_quadprog_and_default_face_solves(
    m: int, n_per_m: int, mean: float, seed: int
):
    G = regularised(per_sample_like(m, n_per_m * m, mean, seed))
    U = problems(m, seed)
    active = U @ G > 0
    tol = DEFAULT_TOL[torch.float64]
    solver = schur_face_solver(G, m)
    assert solver is not None  # regularised and Jacobi-scaled: well-conditioned
    V, converged = principal_pivoting(G, U, active, row_scales(G), tol, 3 * m + 10, None, solver)
    V_default, converged_default = principal_pivoting(G, U, active, row_scales(G), tol, 3 * m + 10)
    assert converged.all()
    assert converged_default.all()
    expected = torch.from_numpy(with_quadprog(G.numpy(), U.numpy()))
    scale = U.abs().amax(dim=1, keepdim=True)
    assert ((V - expected).abs() <= 1e-8 * scale).all()
    assert ((V - V_default).abs() <= 1e-9 * scale).all()
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= 1e-9


def test_rows_whose_face_is_too_big_are_left_unconverged():
    G = regularised(per_sample_like(30, 60, 0.0, 0))
    U = problems(30, 0)
    solver = schur_face_solver(G, 0)
    assert solver is not None
    V, _ = solver(U, U @ G > 0)
    n_active = (U @ G > 0).sum(dim=1)
    trivial = (n_active == 0) | (n_active == 30)
    assert V[~trivial].isnan().all()
    assert not V[trivial].isnan().any()


def test_ill_conditioned_gramian_has_no_schur_solver():
    J = torch.randn(80, 5, dtype=torch.float64)
    G = J @ J.T + 1e-12 * torch.eye(80, dtype=torch.float64)
    assert schur_face_solver(G, 80) is None


@pytest.mark.parametrize("m", [48, _DIRECT_MAX_M + 1, 100])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mean", [0.35, 0.4])
def test_solver_takes_the_schur_path_and_agrees_with_quadprog(
    m: int, dtype: torch.dtype, mean: float
):
    """Few free indices per row (a strong common direction): pivoting through ``G⁻¹``."""
    G = regularised(per_sample_like(m, 4 * m, mean, m))
    U = torch.eye(m, dtype=torch.float64) / m
    assert (U @ G < 0).any()
    assert face_cost(U @ G > 0) <= _SCHUR_BUDGET[torch.float32] * m**3  # the path under test
    _assert_solves(G, U, dtype, 100)


@pytest.mark.parametrize("m", [_DIRECT_MAX_M + 1, 100])
@pytest.mark.parametrize("n_classes", [6, 8])
def test_solver_on_lopsided_faces_agrees_with_quadprog(m: int, n_classes: int):
    """A sixth to an eighth of the indices active per row (as at initialisation), in float32:
    per row, a big face, but the rows of a class share theirs, so pivoting through ``G⁻¹`` runs
    (one factorisation per class); the same problems by ADMM on the Jacobi-scaled problem."""
    G = regularised(last_layer(m, n_classes, m))
    U = torch.eye(m, dtype=torch.float64) / m
    active = U @ G > 0
    n_active = active.sum(dim=1)
    assert torch.minimum(n_active, m - n_active).double().pow(3).sum() > 0.05 * m**3
    assert face_cost(active) <= _SCHUR_BUDGET[torch.float32] * m**3  # distinct faces: cheap
    assert torch.minimum(n_active, m - n_active).double().mean() <= _LOPSIDED * m
    _assert_solves(G, U, torch.float32, 1e4)
    tol = DEFAULT_TOL[torch.float32]
    V = _admm_then_polish(G.float(), U.float(), tol, 10_000, None, lopsided=True).double()
    expected = torch.from_numpy(with_quadprog(G.numpy(), U.numpy()))
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= 1e-4
    assert ((V - expected).abs() <= 1.0 * U.abs().amax(dim=1, keepdim=True)).all()


def test_lopsided_admm_in_float64_meets_kkt():
    m = 100
    G = regularised(last_layer(m, 8, 0))
    U = problems(m, 0)
    V = _admm_then_polish(G, U, DEFAULT_TOL[torch.float64], 10_000, None, lopsided=True)
    assert (V >= U).all()
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= 1e-6


def _assert_solves(G: torch.Tensor, U: torch.Tensor, dtype: torch.dtype, factor: float) -> None:
    """KKT residual within the contract, and weights within ``factor · tol`` of quadprog's."""
    V = solve_lower_bounded_qp(G.to(dtype), U.to(dtype)).double()
    expected = torch.from_numpy(with_quadprog(G.numpy(), U.numpy()))
    tol = {torch.float64: 1e-6, torch.float32: 1e-4}[dtype]
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= tol
    scale = U.abs().amax(dim=1, keepdim=True)
    assert ((V - expected).abs() <= factor * tol * scale).all()


def test_rows_that_pivoting_leaves_go_to_admm():
    """From an empty initial active set (cost 0) on a Wishart Gramian, faces grow beyond m / 4:
    those rows are finished by ADMM, and every row meets the tolerance."""
    from torchjd.linalg._bounded_qp import _schur_pivoting_then_admm

    m = 100
    G = regularised(torch.randn(m, m, dtype=torch.float64))
    U = problems(m, 1)
    active = torch.zeros_like(U, dtype=torch.bool)
    V = _schur_pivoting_then_admm(G, U, active, DEFAULT_TOL[torch.float64], 10_000)
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= 1e-6


@pytest.mark.parametrize("scale", [1.0, 1e40])  # 1e40: the float32 start overflows, unused
@pytest.mark.parametrize("family", ["wishart", "low_rank"])
def test_float64_admm_from_a_float32_start_meets_the_tolerance(scale: float, family: str):
    g = torch.Generator().manual_seed(0)
    m = 40
    if family == "wishart":
        J = torch.randn(m, m, generator=g, dtype=torch.float64)
    else:
        left = torch.randn(m, 8, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 8)
        J = left @ torch.randn(8, 2 * m, generator=g, dtype=torch.float64)
    G = scale * regularised(J)
    U = problems(m, 0)
    V, converged = _admm_from_float32(G, U, DEFAULT_TOL[torch.float64], 10_000, None)
    assert converged.all()
    assert (V >= U).all()
    expected = torch.from_numpy(with_quadprog(G.numpy() / scale, U.numpy()))
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy() / scale, u, v) <= 1e-6
    error = V - expected
    g_norm = torch.einsum("ki,ij,kj->k", expected, G / scale, expected).sqrt()
    g_norm_error = torch.einsum("ki,ij,kj->k", error, G / scale, error).clamp_min(0).sqrt()
    assert (g_norm_error <= 1e-2 * g_norm).all()


def test_large_float64_problems_meet_kkt_and_agree_with_cold_admm():
    """m = 256 in float64: ADMM from the float32 start (quadprog is too slow at this size)."""
    m = 256
    G = regularised(torch.randn(m, 2 * m, generator=torch.Generator().manual_seed(1)).double())
    U = torch.eye(m, dtype=torch.float64) / m
    V = solve_lower_bounded_qp(G, U)
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= 1e-6
    expected, converged = admm(G, U, 1e-9, 10_000)
    assert converged.all()
    error = V - expected
    g_norm = torch.einsum("ki,ij,kj->k", expected, G, expected).sqrt()
    g_norm_error = torch.einsum("ki,ij,kj->k", error, G, error).clamp_min(0).sqrt()
    assert (g_norm_error <= 1e-2 * g_norm).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mean", [0.0, 1.0])
def test_jacobi_scaled_admm_meets_kkt_and_agrees_with_quadprog(dtype: torch.dtype, mean: float):
    """Rows whose norms span two decades: ADMM runs on the Jacobi-scaled problem."""
    m = 48
    G = regularised(per_sample_like(m, 4 * m, mean, 3))
    U = problems(m, 3)
    scale = _jacobi_scale(G.to(dtype))
    assert scale is not None
    tol = DEFAULT_TOL[dtype]
    V, converged, _ = warm_admm(G.to(dtype), U.to(dtype), tol, 10_000, scale=scale)
    assert converged.all()
    V = V.double()
    assert (U.to(dtype).double() <= V).all()
    expected = torch.from_numpy(with_quadprog(G.numpy(), U.numpy()))
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= {torch.float64: 1e-6, torch.float32: 1e-4}[dtype]
    error = V - expected
    g_norm = torch.einsum("ki,ij,kj->k", expected, G, expected).sqrt()
    g_norm_error = torch.einsum("ki,ij,kj->k", error, G, error).clamp_min(0).sqrt()
    assert (g_norm_error <= 1e-2 * g_norm).all()


def test_no_jacobi_scaling_when_the_spread_comes_from_a_low_rank():
    g = torch.Generator().manual_seed(0)
    left = torch.randn(100, 8, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 8)
    J = left @ torch.randn(8, 200, generator=g, dtype=torch.float64)
    G = regularised(J)
    assert G.diagonal().amax() > 10 * G.diagonal().amin()
    assert _jacobi_scale(G) is None
    assert _jacobi_scale(regularised(torch.randn(100, 400, generator=g).double())) is None


@given(
    k=st.integers(1, 40),
    m=st.integers(1, 12),
    n_distinct=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_distinct_faces_against_torch_unique(k: int, m: int, n_distinct: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(n_distinct, m, generator=g) < 0.5
    active = patterns[torch.randint(0, n_distinct, (k,), generator=g)]
    faces, inverse = distinct_faces(active)
    assert torch.equal(faces[inverse], active)
    assert len(faces) == len(torch.unique(active, dim=0))


def test_distinct_faces_survive_colliding_keys(monkeypatch: pytest.MonkeyPatch):
    """With every code equal, faces of the same size collide: each row keeps its own face."""
    import torchjd.linalg._schur_pivoting as module

    monkeypatch.setattr(module, "_GOLDEN", 0.0)
    active = torch.tensor([[True, False], [False, True], [True, False]])
    faces, inverse = distinct_faces(active)
    assert torch.equal(faces[inverse], active)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_classes", [4, 10])
def test_schur_pivoting_with_shared_faces_agrees_with_quadprog(dtype: torch.dtype, n_classes: int):
    """``k ≥ _DISTINCT_MIN_ROWS`` rows whose faces repeat (per-sample problems at
    initialisation): one factorisation per distinct face; every row converged, as quadprog."""
    m = _DISTINCT_MIN_ROWS
    G = regularised(last_layer(m, n_classes, n_classes))
    U = torch.cat([torch.eye(m, dtype=torch.float64) / m, torch.eye(m, dtype=torch.float64)])
    active = U @ G > 0
    assert len(distinct_faces(active)[0]) < m
    result = schur_pivoting(G.to(dtype), U.to(dtype), active, DEFAULT_TOL[dtype], 8, m // 2)
    assert result is not None
    V, converged = result
    assert converged.all()
    assert V.dtype == dtype
    expected = torch.from_numpy(with_quadprog(G.numpy(), U.numpy()))
    tol = {torch.float64: 1e-8, torch.float32: 1e-4}[dtype]
    assert ((V.double() - expected).abs() <= tol * U.abs().amax(dim=1, keepdim=True)).all()


def test_schur_pivoting_of_a_float32_gramian_too_ill_conditioned_for_float32():
    """κ ≈ 10⁴: the float32 inverse would not meet the tolerance; pivoting runs in float64 and
    returns float32 rows that meet it."""
    m = 40
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    G = Q @ torch.diag(torch.logspace(0, -4, m, dtype=torch.float64)) @ Q.T
    G32 = G.float()
    assert scaled_inverse(G32, _MIN_PIVOT[torch.float32]) is None
    U = problems(m, 0)
    result = schur_pivoting(
        G32, U.float(), U.float() @ G32 > 0, DEFAULT_TOL[torch.float32], 3 * m + 10, m
    )
    assert result is not None
    V, converged = result
    assert V.dtype == torch.float32
    for u, v, ok in zip(U.numpy(), V.double().numpy(), converged.tolist(), strict=True):
        if ok:
            assert kkt_violation(G32.double().numpy(), u, v) <= 1e-4
    assert converged.float().mean() >= 0.5


@pytest.mark.parametrize("diagonal", [True, False])
def test_products_with_diagonal_problems(diagonal: bool):
    g = torch.Generator().manual_seed(0)
    G = regularised(torch.randn(6, 9, generator=g, dtype=torch.float64))
    U = torch.diag(torch.rand(6, generator=g, dtype=torch.float64))
    if not diagonal:
        U[0, 3] = 0.5
    torch.testing.assert_close(_times(U, G), U @ G, rtol=1e-14, atol=0)


def test_float32_per_sample_gramian_is_solved_exactly():
    """Per-sample Gramians at initialisation, m = 128 rows in float32 (a few distinct faces): the
    weights are those of quadprog to float32 accuracy, far within what the KKT tolerance allows
    (ADMM, which such problems went to before, was off by 3e-4 here, 3e-3 at m = 256)."""
    m = _DISTINCT_MIN_ROWS
    G = regularised(last_layer(m, 10, 3))
    U = torch.eye(m, dtype=torch.float64) / m
    assert face_cost(U @ G > 0) <= _SCHUR_BUDGET[torch.float32] * m**3
    V = solve_lower_bounded_qp(G.float(), U.float()).double()
    expected = torch.from_numpy(with_quadprog(G.numpy(), U.numpy()))
    assert ((V - expected).abs() <= 1e-5 * U.abs().amax(dim=1, keepdim=True)).all()
