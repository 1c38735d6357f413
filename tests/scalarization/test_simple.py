"""Scalarizer base, Mean, Sum, Constant and Random."""

import pytest
import torch

from torchjd.scalarization import Constant, Mean, Random, Scalarizer, Sum

SHAPES = [(), (1,), (5,), (2, 3), (2, 1, 4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_mean_and_sum_equal_torch(shape: tuple[int, ...]):
    values = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(Mean()(values), values.mean())
    torch.testing.assert_close(Sum()(values), values.sum())
    assert Mean()(values).shape == ()
    (grad,) = torch.autograd.grad(Mean()(values), values)
    torch.testing.assert_close(grad, torch.full_like(values, 1 / values.numel()))


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


def test_random_draws_positive_weights_summing_to_one_from_the_global_generator():
    K = 4
    results = []
    for i in range(K):  # the same draw, applied to each basis vector, reveals the weights
        torch.manual_seed(7)
        results.append(Random()(torch.eye(K, dtype=torch.float64)[i]))
    weights = torch.stack(results)
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.manual_seed(7)
    first = Random()(torch.arange(1.0, 5.0))
    second = Random()(torch.arange(1.0, 5.0))
    torch.manual_seed(7)
    assert torch.equal(Random()(torch.arange(1.0, 5.0)), first)
    assert not torch.equal(first, second)
    assert 1.0 < float(first) < 4.0


def test_random_on_any_shape():
    values = torch.rand(2, 3, requires_grad=True)
    result = Random()(values)
    assert result.shape == ()
    (grad,) = torch.autograd.grad(result, values)
    torch.testing.assert_close(grad.sum(), torch.tensor(1.0))


def test_bad_values():
    for scalarizer in [Mean(), Sum(), Random()]:
        with pytest.raises(TypeError, match=r"`values` must be a torch.Tensor"):
            scalarizer([1.0, 2.0])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"`values` must have a floating-point dtype"):
            scalarizer(torch.tensor([1, 2]))


def test_scalarizer_is_abstract_and_subclassable():
    with pytest.raises(TypeError, match=r"abstract"):
        Scalarizer()  # type: ignore[abstract]

    class Max(Scalarizer):
        def forward(self, values: torch.Tensor, /) -> torch.Tensor:
            return values.max()

    assert Max()(torch.tensor([1.0, 3.0])) == 3.0
    assert repr(Max()) == "Max()"


def test_repr_and_str():
    assert repr(Mean()) == "Mean()"
    assert str(Sum()) == "Sum"
    assert repr(Constant(torch.tensor([1.0, 2.0]))) == "Constant(weights=tensor([1., 2.]))"
