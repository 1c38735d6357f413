import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchjd.scalarization import GeometricMean


@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8), st.floats(1e-2, 1e2))
def test_equals_the_root_of_the_product_and_is_homogeneous(values: list[float], scale: float):
    x = torch.tensor(values, dtype=torch.float64)
    expected = torch.tensor(values, dtype=torch.float64).prod() ** (1 / len(values))
    torch.testing.assert_close(GeometricMean()(x), expected)
    torch.testing.assert_close(GeometricMean()(scale * x), scale * expected)


def test_gradient_weights_each_loss_by_its_inverse():
    x = torch.tensor([[1.0, 2.0], [4.0, 8.0]], dtype=torch.float64, requires_grad=True)
    result = GeometricMean()(x)
    (grad,) = torch.autograd.grad(result, x)
    torch.testing.assert_close(grad, result.detach() / (4 * x.detach()))


def test_no_underflow_where_the_product_underflows():
    x = torch.full((100,), 1e-2)  # the product is 1e-200: 0 in float32
    torch.testing.assert_close(GeometricMean()(x), torch.tensor(1e-2))


def test_zero_gives_zero_and_negative_values_are_refused():
    assert GeometricMean()(torch.tensor([0.0, 3.0])) == 0.0
    with pytest.raises(ValueError, match=r"non-negative values only.*min = -1"):
        GeometricMean()(torch.tensor([-1.0, 3.0]))
