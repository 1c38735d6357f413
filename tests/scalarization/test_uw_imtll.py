"""UW and IMTLL: learnable parameters, checked against their formulas and their gradients."""

import math

import pytest
import torch

from torchjd.scalarization import IMTLL, UW


def _uw(s: list[float], L: list[float]) -> float:
    # Kendall et al.: 1 / (2σ²) L + log σ, with s = log σ²
    sigmas = [math.exp(si / 2) for si in s]
    return sum(
        1 / (2 * sigma**2) * Li + math.log(sigma) for sigma, Li in zip(sigmas, L, strict=True)
    )


def _imtll(s: list[float], L: list[float]) -> float:
    return sum(math.exp(si) * Li - si for si, Li in zip(s, L, strict=True))


@pytest.mark.parametrize(
    ("cls", "name", "reference"), [(UW, "log_var", _uw), (IMTLL, "log_scale", _imtll)]
)
def test_value_against_the_formula(cls: type, name: str, reference: object):
    scalarizer = cls(3)
    parameter = getattr(scalarizer, name)
    assert isinstance(parameter, torch.nn.Parameter)
    assert list(scalarizer.parameters()) == [parameter]
    with torch.no_grad():
        parameter.copy_(torch.tensor([0.5, -1.0, 2.0]))
    L = [1.5, 2.0, 0.25]
    result = scalarizer(torch.tensor(L, dtype=torch.float64))
    assert result.dtype == torch.float64
    torch.testing.assert_close(
        result, torch.tensor(reference(parameter.tolist(), L), dtype=torch.float64)
    )  # type: ignore[operator]


def test_gradients_of_uw():
    scalarizer = UW((2, 2))
    with torch.no_grad():
        scalarizer.log_var.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.5]]))
    L = torch.tensor([[1.0, 2.0], [3.0, 0.5]], requires_grad=True)
    grad_L, grad_s = torch.autograd.grad(scalarizer(L), [L, scalarizer.log_var])
    s = scalarizer.log_var.detach()
    torch.testing.assert_close(grad_L, 0.5 * torch.exp(-s))
    torch.testing.assert_close(grad_s, -0.5 * torch.exp(-s) * L.detach() + 0.5)


def test_gradients_of_imtll_and_its_optimum():
    scalarizer = IMTLL(3)
    L = torch.tensor([0.5, 2.0, 8.0])
    (grad_s,) = torch.autograd.grad(scalarizer(L), [scalarizer.log_scale])
    torch.testing.assert_close(grad_s, L - 1)
    optimizer = torch.optim.SGD(scalarizer.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        scalarizer(L).backward()
        optimizer.step()
    # at the optimum every scaled loss equals one
    torch.testing.assert_close(scalarizer.log_scale.exp() * L, torch.ones(3), atol=1e-3, rtol=0)


def test_reset_is_in_place():
    for scalarizer, parameter in [(UW(2), "log_var"), (IMTLL(2), "log_scale")]:
        before = getattr(scalarizer, parameter)
        with torch.no_grad():
            before.add_(3.0)
        scalarizer.reset()
        assert getattr(scalarizer, parameter) is before
        assert torch.equal(before, torch.zeros(2))


def test_bad_inputs():
    with pytest.raises(
        ValueError, match=r"`values` must have the shape of the log-variances, \(3,\)"
    ):
        UW(3)(torch.ones(2))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the scales, \(2, 2\)"):
        IMTLL([2, 2])(torch.ones(4))
    with pytest.raises(ValueError, match=r"`shape` must be positive. Found shape=0"):
        UW(0)
    with pytest.raises(ValueError, match=r"`shape\[1\]` must be positive"):
        IMTLL((2, -1))
    with pytest.raises(TypeError, match=r"`shape` must be a positive int or a non-empty sequence"):
        UW("3")  # type: ignore[arg-type]


def test_repr():
    assert repr(UW(3)) == "UW(shape=(3,))"
    assert repr(IMTLL([2, 3])) == "IMTLL(shape=(2, 3))"
