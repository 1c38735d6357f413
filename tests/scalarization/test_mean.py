import pytest
import torch

from torchjd.scalarization import Mean

SHAPES = [(), (1,), (5,), (2, 3), (2, 1, 4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_equals_torch_with_a_uniform_gradient(shape: tuple[int, ...]):
    values = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    result = Mean()(values)
    assert result.shape == ()
    torch.testing.assert_close(result, values.mean())
    (grad,) = torch.autograd.grad(result, values)
    torch.testing.assert_close(grad, torch.full_like(values, 1 / values.numel()))


def test_repr():
    assert repr(Mean()) == "Mean()"
