import pytest
import torch

from torchjd.scalarization import Constant

SHAPES = [(), (1,), (5,), (2, 3), (2, 1, 4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_constant_is_the_weighted_sum(shape: tuple[int, ...]):
    weights = torch.randn(shape, dtype=torch.float64)
    values = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    result = Constant(weights)(values)
    expected = sum(
        w * v for w, v in zip(weights.flatten().tolist(), values.flatten().tolist(), strict=True)
    )
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64))
    (grad,) = torch.autograd.grad(result, values)
    torch.testing.assert_close(grad, weights)


def test_constant_copies_its_weights_and_follows_the_values_dtype():
    weights = torch.tensor([1.0, 2.0])
    scalarizer = Constant(weights)
    weights[0] = 100.0
    result = scalarizer(torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert result.dtype == torch.float64
    assert result == 3.0


def test_constant_errors():
    with pytest.raises(ValueError, match=r"`values` must have the shape of the weights, \(2,\)"):
        Constant(torch.ones(2))(torch.ones(3))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the weights, \(2, 1\)"):
        Constant(torch.ones(2, 1))(torch.ones(2))
    with pytest.raises(ValueError, match=r"`weights` must have finite entries"):
        Constant(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match=r"`weights` must have a floating-point dtype"):
        Constant(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"`weights` must be a torch.Tensor"):
        Constant([1.0, 2.0])  # type: ignore[arg-type]


def test_repr():
    assert repr(Constant(torch.tensor([1.0, 2.0]))) == "Constant(weights=tensor([1., 2.]))"
