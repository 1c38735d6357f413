import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchjd.scalarization import PBI

F64 = torch.float64
vectors = st.lists(st.floats(-5.0, 5.0), min_size=3, max_size=3)
positive_vectors = st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3)


def _pbi(theta: float, w: list[float], L: list[float], z: list[float]) -> float:
    norm = math.sqrt(sum(wi * wi for wi in w))
    unit = [wi / norm for wi in w]
    d1 = sum((Li - zi) * ui for Li, zi, ui in zip(L, z, unit, strict=True))
    d2 = math.sqrt(sum((Li - (zi + d1 * ui)) ** 2 for Li, zi, ui in zip(L, z, unit, strict=True)))
    return d1 + theta * d2


@given(vectors, positive_vectors, vectors, st.floats(0.0, 10.0))
def test_against_the_formula(L: list[float], w: list[float], z: list[float], theta: float):
    expected = _pbi(theta, w, L, z)
    result = PBI(theta, torch.tensor(w, dtype=F64), torch.tensor(z, dtype=F64))(
        torch.tensor(L, dtype=F64)
    )
    torch.testing.assert_close(result, torch.tensor(expected, dtype=F64))


def test_on_the_ray_and_its_scale_invariance_in_the_weights():
    w = torch.tensor([1.0, 2.0, 2.0], dtype=F64)
    L = (2.0 * w).requires_grad_()  # on the ray: d2 = 0, d1 = ‖L‖
    result = PBI(5.0, w)(L)
    torch.testing.assert_close(result, torch.tensor(6.0, dtype=F64))
    (grad,) = torch.autograd.grad(result, L)
    assert grad.isfinite().all()
    torch.testing.assert_close(grad, w / 3)
    L2 = torch.tensor([0.3, 1.0, 2.0], dtype=F64)
    torch.testing.assert_close(PBI(2.0, w)(L2), PBI(2.0, 10 * w)(L2))


def test_bad_arguments():
    ones = torch.ones(3)
    with pytest.raises(ValueError, match=r"`theta` must be non-negative. Found theta=-0.5"):
        PBI(-0.5, ones)
    with pytest.raises(ValueError, match=r"`weights` must have a non-zero entry"):
        PBI(1.0, torch.zeros(3))
    with pytest.raises(ValueError, match=r"`weights` and `reference` must have the same shape"):
        PBI(1.0, ones, torch.ones(2))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the weights, \(3,\)"):
        PBI(1.0, ones)(torch.ones(2))


def test_str_and_repr():
    assert str(PBI(1.0, torch.ones(2))) == "PBI"
    assert repr(PBI(1.0, torch.ones(2))) == (
        "PBI(theta=1.0, weights=tensor([1., 1.]), reference=None)"
    )
