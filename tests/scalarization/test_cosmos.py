import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchjd.scalarization import COSMOS

F64 = torch.float64
vectors = st.lists(st.floats(-5.0, 5.0), min_size=3, max_size=3)
positive_vectors = st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3)


@given(positive_vectors, vectors, st.floats(0.0, 10.0))
def test_against_the_formula(L: list[float], r: list[float], lambda_: float):
    linear = sum(ri * Li for ri, Li in zip(r, L, strict=True))
    norms = math.sqrt(sum(ri * ri for ri in r)) * math.sqrt(sum(Li * Li for Li in L))
    expected = linear - lambda_ * linear / norms if norms > 0 else linear
    result = COSMOS(lambda_, torch.tensor(r, dtype=F64))(torch.tensor(L, dtype=F64))
    torch.testing.assert_close(result, torch.tensor(expected, dtype=F64))


def test_penalty_pulls_towards_the_ray():
    r = torch.tensor([1.0, 1.0], dtype=F64)
    # same linear part rᵀL = 2, the one on the ray is lower
    assert COSMOS(1.0, r)(torch.tensor([1.0, 1.0], dtype=F64)) < COSMOS(1.0, r)(
        torch.tensor([2.0, 0.0], dtype=F64)
    )
    assert COSMOS(1.0, r)(torch.zeros(2, dtype=F64)) == 0.0  # no NaN at L = 0


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`lambda_` must be non-negative. Found lambda_=-1.0"):
        COSMOS(-1.0, torch.ones(3))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the weights, \(3,\)"):
        COSMOS(1.0, torch.ones(3))(torch.ones(2))


def test_repr():
    assert repr(COSMOS(2.0, torch.tensor([1.0]))) == "COSMOS(lambda_=2.0, weights=tensor([1.]))"
