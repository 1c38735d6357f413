import pytest
import torch

from tests.reference.matrices import make
from torchjd import Stateful
from torchjd.aggregation import MoCo

F64 = torch.float64


def _simplex_projection(x: torch.Tensor) -> torch.Tensor:
    """By bisection on the threshold τ of max(x − τ, 0) (independent of the library's sort)."""
    low, high = float(x.min()) - 1.0, float(x.max())
    for _ in range(200):
        tau = (low + high) / 2
        low, high = (tau, high) if float((x - tau).clamp_min(0).sum()) > 1 else (low, tau)
    return (x - (low + high) / 2).clamp_min(0)


class _ReferenceMoCo:
    """Fernando et al. (2023), Algorithm 1, with Y_1 = J_1 and λ_0 = 1/m."""

    def __init__(
        self, beta: float, beta_sigma: float, gamma: float, gamma_sigma: float, rho: float
    ):
        self.args = (beta, beta_sigma, gamma, gamma_sigma, rho)
        self.t = 0
        self.Y: torch.Tensor | None = None
        self.lambda_: torch.Tensor | None = None

    def __call__(self, J: torch.Tensor) -> torch.Tensor:
        beta, beta_sigma, gamma, gamma_sigma, rho = self.args
        self.t += 1
        if self.Y is None:
            self.Y, self.lambda_ = (
                J.clone(),
                torch.full((J.shape[0],), 1 / J.shape[0], dtype=J.dtype),
            )
        else:
            self.Y = self.Y - beta / self.t**beta_sigma * (self.Y - J)
        assert self.lambda_ is not None
        step = (self.Y @ self.Y.T + rho * torch.eye(J.shape[0], dtype=J.dtype)) @ self.lambda_
        self.lambda_ = _simplex_projection(self.lambda_ - gamma / self.t**gamma_sigma * step)
        return self.Y.T @ self.lambda_


@pytest.mark.parametrize(
    "args", [(0.5, 0.5, 0.1, 0.5, 0.0), (0.9, 0.0, 0.01, 0.0, 0.1), (1.0, 0.0, 1.0, 1.0, 0.0)]
)
@pytest.mark.parametrize("name", ["normal", "zero_row", "opposite_rows", "mixed_row_norms"])
def test_against_algorithm_1_over_several_steps_and_after_reset(args: tuple, name: str):
    aggregator = MoCo(*args)
    assert isinstance(aggregator, Stateful)
    for _ in range(2):  # the second round runs after reset(): it must replay identically
        reference = _ReferenceMoCo(*args)
        for step in range(6):
            J = make(name, 4, 5, seed=step)
            torch.testing.assert_close(aggregator(J), reference(J), atol=1e-9, rtol=1e-7)
        aggregator.reset()


@pytest.mark.parametrize("seed", [0, 4])
def test_on_a_fixed_matrix_it_converges_to_the_min_norm_point(seed: int):
    # MGDA's optimum: λ ∈ Δ with (Gλ)_i ≥ λᵀGλ for all i, equality where λ_i > 0 (KKT)
    J = make("normal", 3, 6, seed=seed)
    aggregator = MoCo(gamma=0.05, gamma_sigma=0.0)
    for _ in range(2000):
        direction = aggregator(J)
    G_lambda = J @ direction
    value = direction @ direction
    weights = torch.linalg.lstsq(J.T, direction.unsqueeze(1)).solution.squeeze(1)
    assert (G_lambda >= value - 1e-8).all()
    assert ((G_lambda - value).abs() < 1e-8)[weights > 1e-6].all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=F64))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"`beta` must be in \(0, 1\]. Found beta=1.5"):
        MoCo(beta=1.5)
    with pytest.raises(ValueError, match=r"`beta` must be positive. Found beta=0"):
        MoCo(beta=0)
    with pytest.raises(ValueError, match=r"`gamma` must be positive"):
        MoCo(gamma=-0.1)
    with pytest.raises(ValueError, match=r"`rho` must be non-negative. Found rho=-1.0"):
        MoCo(rho=-1.0)
    with pytest.raises(ValueError, match=r"`gamma_sigma` must be non-negative"):
        MoCo(gamma_sigma=-0.5)
    aggregator = MoCo()
    aggregator(torch.ones(2, 3))
    with pytest.raises(
        ValueError, match=r"`matrix` must keep the shape of the previous calls, \(2, 3\)"
    ):
        aggregator(torch.ones(3, 3))
    aggregator.reset()
    assert aggregator(torch.ones(3, 3)).shape == (3,)


def test_repr():
    assert repr(MoCo()) == "MoCo(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0)"


def test_invariant_to_the_order_of_the_rows():
    permutation = torch.tensor([2, 0, 3, 1])
    aggregator, permuted = MoCo(), MoCo()
    for step in range(4):
        J = make("normal", 4, 5, seed=10 + step)
        torch.testing.assert_close(permuted(J[permutation]), aggregator(J))
