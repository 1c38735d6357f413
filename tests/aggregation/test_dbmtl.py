import math

import pytest
import torch

from tests.reference.matrices import make
from torchjd import Stateful
from torchjd.aggregation import DBMTL

F64 = torch.float64


class _ReferenceDBMTL:
    """Lin et al. (2023): EMA of the rows, each rescaled to the largest norm, then summed."""

    def __init__(self, beta: float, beta_sigma: float) -> None:
        self.beta, self.beta_sigma = beta, beta_sigma
        self.t = 0
        self.average: list[torch.Tensor] | None = None

    def __call__(self, J: torch.Tensor) -> torch.Tensor:
        self.t += 1
        beta_t = self.beta / self.t**self.beta_sigma
        previous = self.average or [torch.zeros_like(row) for row in J]
        self.average = [
            beta_t * old + (1 - beta_t) * row for old, row in zip(previous, J, strict=True)
        ]
        norms = [math.sqrt(float(row @ row)) for row in self.average]
        alpha = max(norms)
        direction = torch.zeros(J.shape[1], dtype=J.dtype)
        for row, norm in zip(self.average, norms, strict=True):
            if norm > 0:
                direction += alpha * row / norm
        return direction


@pytest.mark.parametrize(("beta", "beta_sigma"), [(0.9, 0.0), (0.0, 0.0), (0.5, 0.5)])
@pytest.mark.parametrize("name", ["normal", "zero_row", "mixed_row_norms", "opposite_rows"])
def test_against_the_paper_over_several_steps_and_after_reset(
    beta: float, beta_sigma: float, name: str
):
    aggregator = DBMTL(beta, beta_sigma)
    assert isinstance(aggregator, Stateful)
    for _ in range(2):  # the second round runs after reset(): it must replay identically
        reference = _ReferenceDBMTL(beta, beta_sigma)
        for step in range(5):
            J = make(name, 4, 6, seed=step)
            torch.testing.assert_close(aggregator(J), reference(J), atol=1e-9, rtol=1e-7)
        aggregator.reset()


def test_balances_gradient_magnitudes_without_nan():
    J = torch.tensor([[100.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    direction = DBMTL(beta=0.0)(J)
    torch.testing.assert_close(direction, torch.tensor([100.0, 100.0, 0.0], dtype=F64))
    assert torch.equal(DBMTL()(torch.zeros(2, 3)), torch.zeros(3))


def test_bad_inputs_and_repr():
    with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\). Found beta=1.0"):
        DBMTL(beta=1.0)
    with pytest.raises(ValueError, match=r"`beta` must be non-negative. Found beta=-0.1"):
        DBMTL(beta=-0.1)
    with pytest.raises(ValueError, match=r"`beta_sigma` must be non-negative"):
        DBMTL(beta_sigma=-1)
    aggregator = DBMTL()
    aggregator(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"`matrix` must keep the shape of the previous calls"):
        aggregator(torch.ones(2, 4))
    assert repr(DBMTL()) == "DBMTL(beta=0.9, beta_sigma=0.0)"


def test_invariant_to_the_order_of_the_rows_and_homogeneous():
    permutation = torch.tensor([1, 3, 0, 2])
    aggregator, permuted, scaled = DBMTL(), DBMTL(), DBMTL()
    for step in range(4):
        J = make("normal", 4, 5, seed=20 + step)
        direction = aggregator(J)
        torch.testing.assert_close(permuted(J[permutation]), direction)
        torch.testing.assert_close(scaled(3.0 * J), 3.0 * direction)
