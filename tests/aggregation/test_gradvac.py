import math

import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import GradVac, GradVacWeighting


class GradVacByHand:
    """Wang et al. (2021), Algorithm 1, on the rows themselves, with the targets φ̂ kept here."""

    def __init__(self, beta: float, eps: float) -> None:
        self.beta, self.eps, self.phi_hat = beta, eps, None

    def __call__(self, J: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        m = J.shape[0]
        if self.phi_hat is None:
            self.phi_hat = [[0.0] * m for _ in range(m)]
        total = torch.zeros_like(J[0])
        for i in range(m):
            g = J[i].clone()
            for j in order[i].tolist():
                if j == i:
                    continue
                norm_j = float(J[j].norm())
                phi = float(g @ J[j]) / (float(g.norm()) * norm_j + self.eps)
                target = self.phi_hat[i][j]
                if phi < target:
                    numerator = float(g.norm()) * (
                        target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2)
                    )
                    g = g + numerator / (norm_j * math.sqrt(1 - target**2) + self.eps) * J[j]
                self.phi_hat[i][j] = (1 - self.beta) * target + self.beta * phi
            total += g
        return total


@pytest.mark.parametrize(
    "family", ["normal", "common_direction", "zero_row", "huge", "duplicate_rows"]
)
@pytest.mark.parametrize(("m", "beta"), [(2, 0.5), (4, 0.1), (6, 1.0)])
def test_matches_the_algorithm_over_several_calls(family: str, m: int, beta: float):
    aggregator, by_hand = GradVac(beta=beta), GradVacByHand(beta, 1e-8)
    for call in range(3):
        J = make(family, m, 7, seed=call)
        torch.manual_seed(call)
        order = torch.rand(m, m).argsort(dim=1)
        torch.manual_seed(call)
        result = aggregator(J)
        expected = by_hand(J, order)
        scale = J.norm(dim=1).max()
        torch.testing.assert_close(result / scale, expected / scale, atol=1e-9, rtol=0)


def test_reset_forgets_the_targets():
    J = make("normal", 3, 5)
    aggregator = GradVac()
    torch.manual_seed(0)
    first = aggregator(J)
    aggregator(J)
    aggregator.reset()
    torch.manual_seed(0)
    assert torch.equal(aggregator(J), first)


def test_starts_afresh_when_the_number_of_rows_changes():
    weighting = GradVacWeighting()
    weighting(torch.eye(2))
    assert torch.equal(weighting(torch.eye(3)), torch.ones(3))


def test_first_call_on_two_rows_is_pcgrad():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    torch.testing.assert_close(
        GradVac()(J), torch.tensor([0.5848, 3.8012, 3.8012]), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.5}, r"`beta` must be in \[0.0, 1.0\]"),
        ({"eps": -1.0}, "`eps` must be non-negative"),
    ],
)
def test_bad_parameters(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        GradVac(**kwargs)


def test_repr_and_str():
    assert repr(GradVac()) == "GradVac(beta=0.5, eps=1e-08)"
    assert str(GradVac()) == "GradVac"
    assert repr(GradVacWeighting(0.1)) == "GradVacWeighting(beta=0.1, eps=1e-08)"
