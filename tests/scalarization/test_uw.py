import math

import pytest
import torch

from torchjd import Stateful
from torchjd.scalarization import UW


def _uw(s: list[float], L: list[float]) -> float:
    """Kendall et al. (2018): Σ 1 / (2σ²) L + log σ, with s = log σ²."""
    sigmas = [math.exp(si / 2) for si in s]
    return sum(
        1 / (2 * sigma**2) * Li + math.log(sigma) for sigma, Li in zip(sigmas, L, strict=True)
    )


def test_value_against_the_paper():
    scalarizer = UW(3)
    assert isinstance(scalarizer, Stateful)
    assert isinstance(scalarizer.log_var, torch.nn.Parameter)
    assert list(scalarizer.parameters()) == [scalarizer.log_var]
    with torch.no_grad():
        scalarizer.log_var.copy_(torch.tensor([0.5, -1.0, 2.0]))
    L = [1.5, 2.0, 0.25]
    result = scalarizer(torch.tensor(L, dtype=torch.float64))
    assert result.dtype == torch.float64
    expected = _uw(scalarizer.log_var.tolist(), L)
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64))


def test_gradients_against_the_formula():
    scalarizer = UW((2, 2))
    with torch.no_grad():
        scalarizer.log_var.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.5]]))
    L = torch.tensor([[1.0, 2.0], [3.0, 0.5]], requires_grad=True)
    grad_L, grad_s = torch.autograd.grad(scalarizer(L), [L, scalarizer.log_var])
    s = scalarizer.log_var.detach()
    torch.testing.assert_close(grad_L, 0.5 * torch.exp(-s))
    torch.testing.assert_close(grad_s, -0.5 * torch.exp(-s) * L.detach() + 0.5)


def test_training_the_log_variances_reaches_the_losses():
    scalarizer = UW(3)
    L = torch.tensor([0.5, 2.0, 4.0])
    optimizer = torch.optim.SGD(scalarizer.parameters(), lr=0.2)
    for _ in range(400):
        optimizer.zero_grad()
        scalarizer(L).backward()
        optimizer.step()
    # the optimum of ½ e^{-s} L + ½ s is at e^s = L
    torch.testing.assert_close(scalarizer.log_var.exp(), L, atol=1e-3, rtol=1e-3)


def test_reset_is_in_place():
    scalarizer = UW(2)
    before = scalarizer.log_var
    with torch.no_grad():
        before.add_(3.0)
    scalarizer.reset()
    assert scalarizer.log_var is before
    assert torch.equal(before, torch.zeros(2))


def test_bad_inputs():
    with pytest.raises(
        ValueError, match=r"`values` must have the shape of the log-variances, \(3,\)"
    ):
        UW(3)(torch.ones(2))
    with pytest.raises(ValueError, match=r"`shape` must be positive. Found shape=0"):
        UW(0)
    with pytest.raises(TypeError, match=r"`shape` must be a positive int or a non-empty sequence"):
        UW("3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`shape` must be a positive int or a non-empty sequence"):
        UW([])


def test_repr():
    assert repr(UW(3)) == "UW(shape=(3,))"
