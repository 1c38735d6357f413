"""Mean, Sum, Constant and Random."""

import pytest
import torch

from torchjd.aggregation import (
    Constant,
    ConstantWeighting,
    Mean,
    MeanWeighting,
    Random,
    RandomWeighting,
    Sum,
    SumWeighting,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_and_sum_equal_torch(dtype: torch.dtype):
    J = torch.randn(5, 7, dtype=dtype)
    torch.testing.assert_close(Mean()(J), J.mean(dim=0))
    torch.testing.assert_close(Sum()(J), J.sum(dim=0))
    assert MeanWeighting()(J @ J.T).dtype == dtype


def test_constant():
    J = torch.randn(3, 4)
    weights = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(Constant(weights)(J), weights @ J)
    torch.testing.assert_close(ConstantWeighting(weights)(J.double()), weights.double())


def test_constant_copies_its_weights():
    weights = torch.tensor([1.0, 2.0])
    aggregator = Constant(weights)
    weights[0] = 100.0
    assert aggregator.weighting.weights[0] == 1.0
    returned = ConstantWeighting(torch.tensor([1.0, 2.0]))
    output = returned(torch.ones(2, 3))
    output[0] = -5.0  # what the caller does with the weights it gets stays its own
    assert returned(torch.ones(2, 3))[0] == 1.0


def test_constant_errors():
    with pytest.raises(ValueError, match=r"`weights` must be a vector \(1-D tensor\)"):
        Constant(torch.ones(1, 2))
    with pytest.raises(ValueError, match="`weights` must have at least one entry"):
        Constant(torch.ones(0))
    with pytest.raises(ValueError, match="`weights` must have finite entries"):
        Constant(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="`weights` has 3 entries, so `matrix` must have 3 rows"):
        Constant(torch.ones(3))(torch.ones(2, 4))


def test_random_is_reproducible_and_on_the_simplex():
    J = torch.randn(6, 3)
    torch.manual_seed(1)
    first = RandomWeighting()(J)
    second = RandomWeighting()(J)
    torch.manual_seed(1)
    assert torch.equal(RandomWeighting()(J), first)
    assert not torch.equal(first, second)
    assert (first > 0).all()
    torch.testing.assert_close(first.sum(), torch.tensor(1.0))
    torch.manual_seed(1)
    torch.testing.assert_close(Random()(J), first @ J)


def test_weightings_accept_a_gramian_or_a_matrix():
    J = torch.randn(4, 9)
    for weighting in [MeanWeighting(), SumWeighting(), ConstantWeighting(torch.ones(4))]:
        assert torch.equal(weighting(J), weighting(J @ J.T))


def test_str_and_repr():
    assert str(Constant(torch.tensor([1.0, 2.0, 3.0]))) == "Constant([1., 2., 3.])"
    assert repr(Constant(torch.tensor([1.0, 2.0]))) == "Constant(weights=tensor([1., 2.]))"
    assert repr(Mean()) == "Mean()"
    assert str(Sum()) == "Sum"
    assert repr(Random()) == "Random()"
    assert (
        repr(ConstantWeighting(torch.tensor([0.5])))
        == "ConstantWeighting(weights=tensor([0.5000]))"
    )
