import pytest
import torch

from torchjd.scalarization import Sum


@pytest.mark.parametrize("shape", [(), (1,), (5,), (2, 3), (2, 1, 4)])
def test_equals_torch_with_a_unit_gradient(shape: tuple[int, ...]):
    values = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    result = Sum()(values)
    assert result.shape == ()
    torch.testing.assert_close(result, values.sum())
    (grad,) = torch.autograd.grad(result, values)
    torch.testing.assert_close(grad, torch.ones_like(values))


def test_str():
    assert str(Sum()) == "Sum"
