"""``norm_eps`` and ``reg_eps`` of the projectors are properties, read and set, checked as by the
constructor."""

import math
from typing import Any

import pytest
import torch

from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import QuadprogProjector, TorchProjector

PROJECTORS = [TorchProjector, QuadprogProjector]


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    J = torch.randn(6, 4, generator=generator, dtype=torch.float64)  # rank 4: singular Gramian
    J[1] -= 2.0 * J[0]
    J[2] *= 1e-3  # a small row: the regularisation shows
    return torch.eye(6, dtype=torch.float64), J @ J.T


@pytest.mark.parametrize("cls", PROJECTORS)
@pytest.mark.parametrize(("norm_eps", "reg_eps"), [(0.0, 0.0), (1e-3, 1e-5), (1e6, 0.1)])
def test_get_and_set(cls: type, norm_eps: float, reg_eps: float):
    U, G = problem()
    projector = cls(norm_eps=norm_eps, reg_eps=reg_eps)
    assert (projector.norm_eps, projector.reg_eps) == (norm_eps, reg_eps)
    changed = cls()
    changed.norm_eps, changed.reg_eps = norm_eps, reg_eps
    assert (changed.norm_eps, changed.reg_eps) == (norm_eps, reg_eps)
    assert repr(changed) == repr(projector)
    torch.testing.assert_close(changed(U, G), projector(U, G), rtol=0.0, atol=1e-12)
    # through UPGrad's weighting (its own route for the sum of the projections)
    weighting = UPGradWeighting(projector=cls())
    weighting.projector.norm_eps, weighting.projector.reg_eps = norm_eps, reg_eps
    expected = UPGradWeighting(projector=cls(norm_eps=norm_eps, reg_eps=reg_eps))(G)
    torch.testing.assert_close(weighting(G), expected, rtol=0.0, atol=1e-12)
    assert not torch.allclose(UPGradWeighting(projector=cls())(G), expected, rtol=0.0, atol=1e-9)


@pytest.mark.parametrize("cls", PROJECTORS)
@pytest.mark.parametrize("name", ["norm_eps", "reg_eps"])
@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1.0, ValueError, "must be non-negative"),
        (math.nan, ValueError, "must be non-negative"),
        ("small", TypeError, "must be a float"),
        (None, TypeError, "must be a float"),
        (True, TypeError, "must be a float"),
    ],
)
def test_an_invalid_set_raises_as_the_constructor_and_changes_nothing(
    cls: type, name: str, value: Any, error: type[Exception], message: str
):
    with pytest.raises(error, match=f"`{name}` {message}") as from_constructor:
        cls(**{name: value})
    U, G = problem()
    projector = cls(norm_eps=1e-3, reg_eps=1e-5)
    before = projector(U, G)
    with pytest.raises(error, match=f"`{name}` {message}") as from_setter:
        setattr(projector, name, value)
    assert str(from_setter.value) == str(from_constructor.value)
    assert (projector.norm_eps, projector.reg_eps) == (1e-3, 1e-5)
    torch.testing.assert_close(projector(U, G), before, rtol=0.0, atol=0.0)


def test_the_properties_are_typed_and_documented():
    for name in ["norm_eps", "reg_eps"]:
        descriptor = getattr(QuadprogProjector, name)
        assert isinstance(descriptor, property)
        assert descriptor.fset is not None
        assert descriptor.__doc__
        assert descriptor.fget.__annotations__["return"] is float
