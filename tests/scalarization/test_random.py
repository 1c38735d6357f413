import torch

from torchjd.scalarization import Random


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


def test_repr():
    assert repr(Random()) == "Random()"
