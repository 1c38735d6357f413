"""The exact mode's pre-test of a positive span (``_bounded_qp._certainly_pointed``) and its
shared range factor (``_bounded_qp._lazy_range_factor``).

The pre-test certifies that the rows of ``J`` do not positively span a subspace (a vector of the
range of ``G`` positive on every nonzero row); it may miss such rows, never wrongly certify: it is
checked against a linear program (HiGHS: some ``w ≥ 1`` on the nonzero rows with ``Jᵀ w = 0``).
Where it certifies, the zero-update route declines before its batch, with the rows it would have
left. The routes of one call up to ``m = 64`` form one range factor of ``G`` and give the rows
they gave with one each."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from tests.linalg.test_xs3_give_up import degenerate_jacobian
from tests.linalg.test_xs4_zero_update import spanning_jacobian
from torchjd.linalg import _bounded_qp
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, _certainly_pointed, _exact_unit_route
from torchjd.linalg._spanning import range_factor

TOL = LEAST_NORM_TOL[torch.float64]


def positively_spans(J: torch.Tensor) -> bool:
    """Whether some ``w`` with ``w_j ≥ 1`` on the nonzero rows of ``J`` (``≥ 0`` on the others)
    has ``Jᵀ w = 0`` (HiGHS): the rows of ``J`` positively span a subspace."""
    m = J.shape[0]
    nonzero = J.abs().sum(dim=1) > 0
    result = linprog(
        np.zeros(m),
        A_eq=J.T.numpy(),
        b_eq=np.zeros(J.shape[1]),
        bounds=[(1.0 if bool(row) else 0.0, None) for row in nonzero],
        method="highs",
    )
    assert result.status in (0, 2)  # feasible or infeasible, nothing else
    return result.status == 0


def certified(J: torch.Tensor) -> bool:
    """:func:`_certainly_pointed` of ``G = J Jᵀ`` (float64, singular)."""
    G = J @ J.T
    factor = range_factor(G, torch.float64)
    assert factor is not None
    return _certainly_pointed(G, *factor)


def mixed_jacobian(m: int, n: int, shift: float, seed: int, zero_rows: bool) -> torch.Tensor:
    """``m`` rows in ``n`` dimensions around a shared direction (of weight ``shift``: the larger,
    the less often the rows positively span), norms over two decades, and some zero rows."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    J = J + shift * torch.randn(1, n, generator=g, dtype=torch.float64)
    J = J * 10 ** (2 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 1)
    if zero_rows:
        J[: m // 8] = 0.0
    return J


def half_space_jacobian(m: int, n: int, seed: int) -> torch.Tensor:
    """Rows of equal norm in the open half-space of positive first coordinate: their Gramian has
    negative entries, and the all-ones vector (``J e₁`` over its first column's value) lies in the
    range of its Jacobi-scaled form, positive, which certifies them."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    return torch.cat([torch.full((m, 1), 0.3, dtype=torch.float64), X], dim=1)


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(33, 64),
    n_fraction=st.floats(0.05, 1 / 3),
    shift=st.floats(0.0, 1.5),
    seed=st.integers(0, 2**16),
    zero_rows=st.booleans(),
)
def test_never_certifies_rows_that_positively_span(
    m: int, n_fraction: float, shift: float, seed: int, zero_rows: bool
):
    """Rows that span or not (the linear program tells): a certificate only for those that do
    not."""
    J = mixed_jacobian(m, max(2, int(n_fraction * m)), shift, seed, zero_rows)
    if certified(J):
        assert not positively_spans(J)


@pytest.mark.parametrize(
    "family", ["normal", "mixed_row_norms", "low_rank", "opposite_rows", "zero_rows"]
)
def test_positive_spans_are_not_certified(family: str):
    """The zero-update route's positive spans: no certificate."""
    J = spanning_jacobian(64, 10, 7, family)
    assert positively_spans(J)
    assert not certified(J)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_in_a_half_space_are_certified(seed: int):
    """Rows in an open half-space that the linear program confirms do not span: certified."""
    J = half_space_jacobian(64, 12, seed)
    assert not positively_spans(J)
    assert certified(J)


@pytest.mark.parametrize("seed", [0, 1])
def test_certified_rows_skip_the_batch(seed: int, monkeypatch: pytest.MonkeyPatch):
    """Where the pre-test certifies, the zero-update route declines without its batch (no Newton
    step), and the rows are bit for bit those without the pre-test (whose batch's sentinel then
    stops it)."""
    J = half_space_jacobian(64, 12, seed)
    G = J @ J.T
    G = G / G.diagonal().sum()
    batches = []
    projection = _bounded_qp.null_space_projection
    monkeypatch.setattr(
        _bounded_qp,
        "null_space_projection",
        lambda *args, **kwargs: batches.append(args) or projection(*args, **kwargs),
    )
    results = []
    route = _bounded_qp._small_zero_update_rows

    def spied(*args):
        results.append(route(*args))
        return results[-1]

    monkeypatch.setattr(_bounded_qp, "_small_zero_update_rows", spied)
    V = _exact_unit_route(G, TOL, 10_000)
    assert results == [None]
    assert batches == []
    monkeypatch.setattr(_bounded_qp, "_certainly_pointed", lambda G, ell, sqrt_weights: False)
    assert torch.equal(V, _exact_unit_route(G, TOL, 10_000))
    assert len(batches) > 0


@pytest.mark.parametrize(
    ("J", "dtype", "unshared"),
    [
        (spanning_jacobian(64, 8, 3, "normal"), torch.float64, 2),  # zero update, polish
        (degenerate_jacobian(0), torch.float64, 3),  # zero update (declined), fallback, polish
        (degenerate_jacobian(0), torch.float32, 1),  # fallback (its rank read for float32)
    ],
)
def test_one_range_factor_per_call(
    J: torch.Tensor, dtype: torch.dtype, unshared: int, monkeypatch: pytest.MonkeyPatch
):
    """The routes of one call form the range factor of ``G`` once (``unshared`` times when each
    forms its own), and give the same rows as when each forms its own."""
    G = (J @ J.T).to(dtype)
    G = G / G.diagonal().sum()
    formed = []

    def counted(G: torch.Tensor, dtype: torch.dtype):
        formed.append(dtype)
        return range_factor(G, dtype)

    monkeypatch.setattr(_bounded_qp, "range_factor", counted)
    V = _exact_unit_route(G, LEAST_NORM_TOL[dtype], 10_000)
    assert formed == [dtype]
    monkeypatch.setattr(
        _bounded_qp,
        "_lazy_range_factor",
        lambda G_exact: lambda: counted(G_exact.double(), G_exact.dtype),
    )
    formed.clear()
    assert torch.equal(V, _exact_unit_route(G, LEAST_NORM_TOL[dtype], 10_000))
    assert formed == [dtype] * unshared
