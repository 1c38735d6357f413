import pytest
import torch

from tests.reference.matrices import make
from tests.reference.simplex import project_by_bisection
from torchjd.aggregation import MoDoWeighting


@pytest.mark.parametrize(("gamma", "rho"), [(0.1, 0.1), (1.0, 0.0), (0.01, 2.0)])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_projected_steps_over_calls(gamma: float, rho: float, m: int):
    """Chen et al. (2024), Eq. 2.9a, with A = J_1 J_2ᵀ from two independent batches."""
    weighting = MoDoWeighting(gamma, rho)
    lambda_ = torch.full((m,), 1.0 / m, dtype=torch.float64)
    for call in range(4):
        J1, J2 = (
            make("normal", m, 6, seed=2 * call),
            make("common_direction", m, 6, seed=2 * call + 1),
        )
        A = J1 @ J2.T
        lambda_ = project_by_bisection(lambda_ - gamma * (A @ lambda_ + rho * lambda_))
        torch.testing.assert_close(weighting(A), lambda_, atol=1e-12, rtol=0)


def test_reset():
    weighting = MoDoWeighting(gamma=1.0)
    A = make("normal", 3, 3)
    first = weighting(A)
    assert not torch.equal(weighting(A), first)
    weighting.reset()
    assert torch.equal(weighting(A), first)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"gamma": 0.0}, ValueError, "`gamma` must be positive"),
        ({"rho": -1.0}, ValueError, "`rho` must be non-negative"),
    ],
)
def test_bad_parameters(kwargs: dict, error: type, message: str):
    with pytest.raises(error, match=message):
        MoDoWeighting(**kwargs)


def test_non_square_input():
    with pytest.raises(ValueError, match=r"`matrix` must be a square matrix \[m, m\]"):
        MoDoWeighting()(torch.ones(2, 3))


def test_repr_and_str():
    assert repr(MoDoWeighting()) == "MoDoWeighting(gamma=0.1, rho=0.1)"
    assert str(MoDoWeighting()) == "MoDoWeighting(gamma=0.1, rho=0.1)"
