import math

import pytest
import torch

from torchjd import Stateful
from torchjd.scalarization import IMTLL


def test_value_against_the_paper():
    scalarizer = IMTLL(3)
    assert isinstance(scalarizer, Stateful)
    assert list(scalarizer.parameters()) == [scalarizer.log_scale]
    with torch.no_grad():
        scalarizer.log_scale.copy_(torch.tensor([0.5, -1.0, 2.0]))
    L = [1.5, 2.0, 0.25]
    result = scalarizer(torch.tensor(L, dtype=torch.float64))
    s = scalarizer.log_scale.tolist()
    expected = sum(math.exp(si) * Li - si for si, Li in zip(s, L, strict=True))
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64))


def test_gradients_and_the_optimum():
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
    scalarizer = IMTLL((1, 2))
    before = scalarizer.log_scale
    with torch.no_grad():
        before.add_(3.0)
    scalarizer.reset()
    assert scalarizer.log_scale is before
    assert torch.equal(before, torch.zeros(1, 2))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"`values` must have the shape of the scales, \(2, 2\)"):
        IMTLL([2, 2])(torch.ones(4))
    with pytest.raises(ValueError, match=r"`shape\[1\]` must be positive. Found shape\[1\]=-1"):
        IMTLL((2, -1))
    with pytest.raises(TypeError, match=r"`shape\[0\]` must be an int"):
        IMTLL((2.0,))  # type: ignore[arg-type]


def test_repr():
    assert repr(IMTLL([2, 3])) == "IMTLL(shape=(2, 3))"
