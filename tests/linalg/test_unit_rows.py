"""UPGrad's problems solved as those of the unit vectors up to ``m = 64`` (``v(p_i e_i) = p_i
v(e_i)``: :func:`~torchjd.linalg._bounded_qp._small_unit_route` and
``TorchProjector._summed_projections``), against quadprog (Goldfarb-Idnani's dual method, an
independent algorithm), the primal reference of UPGrad, and the general path of the projector."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchjd.linalg._small_pivoting as small_pivoting_module
from tests.linalg.test_small_pivoting import gramians, random_problem
from tests.reference.aggregators import upgrad_weights
from tests.reference.dual_cone import kkt_violation, with_quadprog
from tests.reference.matrices import FACTORIES, make
from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import QuadprogProjector, TorchProjector
from torchjd.linalg._bounded_qp import _small_unit_route


def assert_unit_rows_optimal(G: torch.Tensor, X: torch.Tensor, solved: torch.Tensor) -> None:
    """The solved rows of ``X`` are the optima ``v(e_i)`` (quadprog, and the KKT conditions)."""
    m = G.shape[0]
    G64 = G.double().numpy()
    expected = with_quadprog(G64, np.eye(m))
    for i in solved.nonzero().squeeze(1).tolist():
        np.testing.assert_allclose(X[i].numpy(), expected[i], rtol=0, atol=1e-7)
        assert kkt_violation(G64, np.eye(m)[i], X[i].numpy()) <= 1e-7
    eye = torch.eye(m, dtype=X.dtype)
    assert torch.ge(X, eye).all()  # v ≥ u exactly


@pytest.mark.parametrize("m", [2, 8, 9, 16, 24, 25, 40, 64])
@pytest.mark.parametrize("family", ["low_rank", "normal", "mixed_row_norms", "per_sample"])
def test_unit_route_matches_quadprog(m: int, family: str):
    G = gramians(m)[family]
    X, solved = _small_unit_route(G, 1e-7)
    assert X.dtype == torch.float64
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)


@given(m=st.integers(9, 64), n=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_unit_route_matches_quadprog_on_random_problems(m: int, n: int, seed: int):
    """Row norms over four decades, rank ``min(m, n)`` (plus the regularisation): the rows said
    solved are optimal, and the rows left are few (they would take the general route)."""
    G, _ = random_problem(m, n, seed)
    X, solved = _small_unit_route(G, 1e-7)
    assert_unit_rows_optimal(G, X, solved)
    assert solved.double().mean() >= 0.9


def test_unit_route_without_conflict_needs_one_face_solve(monkeypatch: pytest.MonkeyPatch):
    """``G ≥ 0`` entrywise (no row conflicts with another): the initial guess ``{j : G_ij > 0}``
    is every index, and is right at once."""
    calls = []
    solve = small_pivoting_module._Faces.solve

    def spy(self, *args):
        calls.append(1)
        return solve(self, *args)

    monkeypatch.setattr(small_pivoting_module._Faces, "solve", spy)
    J = torch.rand(40, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = J @ J.T / (J @ J.T).trace() + 1e-4 * torch.eye(40, dtype=torch.float64)
    X, solved = _small_unit_route(G, 1e-7)
    assert calls == [1]
    assert solved.all()
    torch.testing.assert_close(X, torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-15)


def jacobians(max_m: int = 64, max_n: int = 80):
    """Matrices of every family of the reference (zero, duplicate, opposite rows, rank-deficient,
    tiny, huge, spread row norms), of any size up to ``max_m`` rows."""
    return st.builds(
        make,
        st.sampled_from(sorted(FACTORIES)),
        st.integers(1, max_m),
        st.integers(1, max_n),
        st.just(torch.float64),
        st.integers(0, 2**16),
    )


@given(J=jacobians(), with_preference=st.booleans(), seed=st.integers(0, 2**16))
def test_weights_match_the_general_path(J: torch.Tensor, with_preference: bool, seed: int):
    """The weights equal the sum of the rows that the projector returns for ``diag(p)`` (another
    route through the solver) to ``1e-9`` of the largest weight, in float64 and float32."""
    m = J.shape[0]
    generator = torch.Generator().manual_seed(seed)
    p = torch.rand(m, generator=generator, dtype=torch.float64) * (torch.rand(m) < 0.8)
    G = J @ J.T
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        pref = p.to(dtype) if with_preference else None
        weights = UPGradWeighting(pref)(G.to(dtype))
        U = torch.diag(pref if pref is not None else torch.full((m,), 1 / m, dtype=dtype))
        expected = TorchProjector()(U, G.to(dtype)).sum(dim=0)
        assert weights.dtype == dtype
        scale = expected.abs().max().clamp_min(1e-30)
        assert ((weights - expected).abs().max() / scale) <= tol


@pytest.mark.parametrize("m", [1, 5, 12, 30, 64])
@pytest.mark.parametrize("family", ["normal", "rank_deficient", "opposite_rows", "mixed_row_norms"])
def test_weights_match_the_primal_reference(m: int, family: str):
    J = make(family, m, 2 * m + 1, seed=m)
    p = torch.linspace(0.0, 1.0, m, dtype=torch.float64)
    for pref in (None, p):
        expected = upgrad_weights(J.numpy(), None if pref is None else pref.numpy())
        weights = UPGradWeighting(pref)(J @ J.T)
        np.testing.assert_allclose(weights.numpy(), expected, rtol=0, atol=1e-6)


def test_non_finite_and_vanishing_gramians():
    G = make("normal", 20, 10) @ make("normal", 20, 10).T
    G[3, 4] = G[4, 3] = torch.nan
    assert UPGradWeighting()(G).isnan().all()
    tiny = 1e-6 * torch.eye(20, dtype=torch.float64)  # trace below norm_eps: the mean
    torch.testing.assert_close(UPGradWeighting()(tiny), torch.full((20,), 1 / 20).double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_takes_the_general_path(dtype: torch.dtype):
    J = make("normal", 16, 20, dtype=torch.float32)
    weights = UPGradWeighting()((J @ J.T).to(dtype))
    assert weights.dtype == dtype
    expected = UPGradWeighting()(J @ J.T)
    torch.testing.assert_close(weights.float(), expected, rtol=0, atol=2e-2)


def test_subclass_with_its_own_call_is_called():
    calls = []

    class Spy(TorchProjector):
        def __call__(self, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
            calls.append(U.shape)
            return super().__call__(U, G)

    J = make("normal", 10, 12)
    weights = UPGradWeighting(projector=Spy())(J @ J.T)
    assert calls == [(10, 10)]
    torch.testing.assert_close(weights, UPGradWeighting()(J @ J.T))


@pytest.mark.parametrize("backend", ["torch", "quadprog"])
def test_quadprog_projector_backends(backend: str):
    J = make("mixed_row_norms", 30, 40)
    weights = UPGradWeighting(projector=QuadprogProjector(reg_eps=1e-5, backend=backend))(J @ J.T)
    expected = upgrad_weights(J.numpy(), reg_eps=1e-5)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=0, atol=1e-6)


def test_weights_are_normal_tensors_usable_by_autograd():
    """The solve runs in inference mode; its weights come out as a normal tensor, which autograd
    can save (here, in a product with a tensor that requires grad)."""
    J = make("normal", 30, 20)
    weights = UPGradWeighting()(J @ J.T)
    assert not weights.is_inference()
    x = torch.ones(30, dtype=torch.float64, requires_grad=True)
    (weights * x * x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * weights)


def test_a_gramian_that_requires_grad_keeps_its_graph():
    J = make("normal", 30, 20)
    G = (J @ J.T).requires_grad_()
    weights = UPGradWeighting()(G)
    assert weights.grad_fn is not None
    torch.testing.assert_close(weights.detach(), UPGradWeighting()(G.detach()))


@pytest.mark.parametrize("reg_eps", [1e-4, 0.0])
def test_projector_rows_are_normal_tensors(reg_eps: float):
    """The projector solves in inference mode too (default and exact mode, small and large
    problems); its rows come out as normal tensors, distinct from the input."""
    for m in (5, 40, 70):
        J = make("normal", m, 20)
        U = torch.eye(m, dtype=torch.float64)
        V = TorchProjector(norm_eps=reg_eps, reg_eps=reg_eps)(U, J @ J.T)
        assert not V.is_inference()
        assert V.data_ptr() != U.data_ptr()
        x = torch.ones(m, dtype=torch.float64, requires_grad=True)
        (V.sum(dim=0) * x * x).sum().backward()
