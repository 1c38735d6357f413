"""STCH, PBI and COSMOS: multi-objective scalarizations, against their papers' formulas."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchjd.scalarization import COSMOS, PBI, STCH

F64 = torch.float64
vectors = st.lists(st.floats(-5.0, 5.0), min_size=3, max_size=3)
positive_vectors = st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3)


def _stch(mu: float, w: list[float], L: list[float], z: list[float]) -> float:
    terms = [wi * (Li - zi) / mu for wi, Li, zi in zip(w, L, z, strict=True)]
    top = max(terms)
    return mu * (top + math.log(sum(math.exp(t - top) for t in terms)))


@given(vectors, positive_vectors, vectors, st.floats(0.01, 10.0))
def test_stch_against_the_formula(L: list[float], w: list[float], z: list[float], mu: float):
    expected = _stch(mu, w, L, z)
    result = STCH(mu, torch.tensor(w, dtype=F64), torch.tensor(z, dtype=F64))(
        torch.tensor(L, dtype=F64)
    )
    torch.testing.assert_close(result, torch.tensor(expected, dtype=F64))


def test_stch_defaults_and_its_bounds_around_tchebycheff():
    L = torch.tensor([[1.0, 2.0], [4.0, 0.5]], dtype=F64)
    expected = _stch(0.3, [0.25] * 4, L.flatten().tolist(), [0.0] * 4)
    torch.testing.assert_close(STCH(0.3)(L), torch.tensor(expected, dtype=F64))
    w = torch.tensor([[1.0, 3.0], [0.5, 2.0]], dtype=F64)
    tchebycheff = (w * L).max()
    for mu in [1.0, 0.1, 0.001]:
        value = STCH(mu, w)(L)
        assert tchebycheff <= value <= tchebycheff + mu * math.log(4) + 1e-12


def test_stch_gradient_is_a_softmax_weighting():
    L = torch.tensor([1.0, 2.0, 3.0], dtype=F64, requires_grad=True)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    (grad,) = torch.autograd.grad(STCH(0.5, w)(L), L)
    torch.testing.assert_close(grad, w * torch.softmax(w * L.detach() / 0.5, dim=0))


def _pbi(theta: float, w: list[float], L: list[float], z: list[float]) -> float:
    norm = math.sqrt(sum(wi * wi for wi in w))
    unit = [wi / norm for wi in w]
    d1 = sum((Li - zi) * ui for Li, zi, ui in zip(L, z, unit, strict=True))
    d2 = math.sqrt(sum((Li - (zi + d1 * ui)) ** 2 for Li, zi, ui in zip(L, z, unit, strict=True)))
    return d1 + theta * d2


@given(vectors, positive_vectors, vectors, st.floats(0.0, 10.0))
def test_pbi_against_the_formula(L: list[float], w: list[float], z: list[float], theta: float):
    expected = _pbi(theta, w, L, z)
    result = PBI(theta, torch.tensor(w, dtype=F64), torch.tensor(z, dtype=F64))(
        torch.tensor(L, dtype=F64)
    )
    torch.testing.assert_close(result, torch.tensor(expected, dtype=F64))


def test_pbi_on_the_ray_and_its_scale_invariance_in_the_weights():
    w = torch.tensor([1.0, 2.0, 2.0], dtype=F64)
    L = (2.0 * w).requires_grad_()  # on the ray: d2 = 0, d1 = ‖L‖
    result = PBI(5.0, w)(L)
    torch.testing.assert_close(result, torch.tensor(6.0, dtype=F64))
    (grad,) = torch.autograd.grad(result, L)
    assert grad.isfinite().all()
    torch.testing.assert_close(grad, w / 3)
    L2 = torch.tensor([0.3, 1.0, 2.0], dtype=F64)
    torch.testing.assert_close(PBI(2.0, w)(L2), PBI(2.0, 10 * w)(L2))


@given(positive_vectors, vectors, st.floats(0.0, 10.0))
def test_cosmos_against_the_formula(L: list[float], r: list[float], lambda_: float):
    linear = sum(ri * Li for ri, Li in zip(r, L, strict=True))
    norms = math.sqrt(sum(ri * ri for ri in r)) * math.sqrt(sum(Li * Li for Li in L))
    expected = linear - lambda_ * linear / norms if norms > 0 else linear
    result = COSMOS(lambda_, torch.tensor(r, dtype=F64))(torch.tensor(L, dtype=F64))
    torch.testing.assert_close(result, torch.tensor(expected, dtype=F64))


def test_cosmos_penalty_pulls_towards_the_ray():
    r = torch.tensor([1.0, 1.0], dtype=F64)
    # same linear part rᵀL = 2, the one on the ray is lower
    assert COSMOS(1.0, r)(torch.tensor([1.0, 1.0], dtype=F64)) < COSMOS(1.0, r)(
        torch.tensor([2.0, 0.0], dtype=F64)
    )
    assert COSMOS(1.0, r)(torch.zeros(2, dtype=F64)) == 0.0  # no NaN at L = 0


def test_bad_arguments():
    ones = torch.ones(3)
    with pytest.raises(ValueError, match=r"`mu` must be positive. Found mu=-1.0"):
        STCH(-1.0)
    with pytest.raises(ValueError, match=r"`mu` must be positive. Found mu=0"):
        STCH(0)
    with pytest.raises(ValueError, match=r"`theta` must be non-negative. Found theta=-0.5"):
        PBI(-0.5, ones)
    with pytest.raises(ValueError, match=r"`lambda_` must be non-negative. Found lambda_=-1.0"):
        COSMOS(-1.0, ones)
    with pytest.raises(ValueError, match=r"`weights` must have a non-zero entry"):
        PBI(1.0, torch.zeros(3))
    with pytest.raises(ValueError, match=r"`weights` and `reference` must have the same shape"):
        STCH(1.0, ones, torch.ones(2))
    with pytest.raises(ValueError, match=r"`weights` and `reference` must have the same shape"):
        PBI(1.0, ones, torch.ones(2))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the weights, \(3,\)"):
        STCH(1.0, ones)(torch.ones(4))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the reference, \(3,\)"):
        STCH(1.0, reference=ones)(torch.ones(2))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the weights, \(3,\)"):
        PBI(1.0, ones)(torch.ones(2))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the weights, \(3,\)"):
        COSMOS(1.0, ones)(torch.ones(2))
    with pytest.raises(TypeError, match=r"`mu` must be a float"):
        STCH("1")  # type: ignore[arg-type]


def test_repr():
    assert repr(STCH(1.0)) == "STCH(mu=1.0, weights=None, reference=None)"
    assert repr(COSMOS(2.0, torch.tensor([1.0]))) == "COSMOS(lambda_=2.0, weights=tensor([1.]))"
    assert str(PBI(1.0, torch.ones(2))) == "PBI"
