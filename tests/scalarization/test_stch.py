import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchjd.scalarization import STCH

F64 = torch.float64
vectors = st.lists(st.floats(-5.0, 5.0), min_size=3, max_size=3)
positive_vectors = st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3)


def _stch(mu: float, w: list[float], L: list[float], z: list[float]) -> float:
    terms = [wi * (Li - zi) / mu for wi, Li, zi in zip(w, L, z, strict=True)]
    top = max(terms)
    return mu * (top + math.log(sum(math.exp(t - top) for t in terms)))


@given(vectors, positive_vectors, vectors, st.floats(0.01, 10.0))
def test_against_the_formula(L: list[float], w: list[float], z: list[float], mu: float):
    expected = _stch(mu, w, L, z)
    result = STCH(mu, torch.tensor(w, dtype=F64), torch.tensor(z, dtype=F64))(
        torch.tensor(L, dtype=F64)
    )
    torch.testing.assert_close(result, torch.tensor(expected, dtype=F64))


def test_defaults_and_its_bounds_around_tchebycheff():
    L = torch.tensor([[1.0, 2.0], [4.0, 0.5]], dtype=F64)
    expected = _stch(0.3, [0.25] * 4, L.flatten().tolist(), [0.0] * 4)
    torch.testing.assert_close(STCH(0.3)(L), torch.tensor(expected, dtype=F64))
    w = torch.tensor([[1.0, 3.0], [0.5, 2.0]], dtype=F64)
    tchebycheff = (w * L).max()
    for mu in [1.0, 0.1, 0.001]:
        value = STCH(mu, w)(L)
        assert tchebycheff <= value <= tchebycheff + mu * math.log(4) + 1e-12


def test_gradient_is_a_softmax_weighting():
    L = torch.tensor([1.0, 2.0, 3.0], dtype=F64, requires_grad=True)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    (grad,) = torch.autograd.grad(STCH(0.5, w)(L), L)
    torch.testing.assert_close(grad, w * torch.softmax(w * L.detach() / 0.5, dim=0))


def test_bad_arguments():
    ones = torch.ones(3)
    with pytest.raises(ValueError, match=r"`mu` must be positive. Found mu=-1.0"):
        STCH(-1.0)
    with pytest.raises(ValueError, match=r"`mu` must be positive. Found mu=0"):
        STCH(0)
    with pytest.raises(TypeError, match=r"`mu` must be a float"):
        STCH("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`weights` and `reference` must have the same shape"):
        STCH(1.0, ones, torch.ones(2))
    with pytest.raises(ValueError, match=r"`weights` must have finite entries"):
        STCH(1.0, torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the weights, \(3,\)"):
        STCH(1.0, ones)(torch.ones(4))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the reference, \(3,\)"):
        STCH(1.0, reference=ones)(torch.ones(2))


def test_repr():
    assert repr(STCH(1.0)) == "STCH(mu=1.0, weights=None, reference=None)"
