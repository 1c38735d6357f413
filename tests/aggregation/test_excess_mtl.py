import math

import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import ExcessMTL, ExcessMTLWeighting


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


class ExcessMTLByHand:
    """He et al. (2024), Eqs. 6-9, task by task and coordinate by coordinate."""

    def __init__(self, eta: float, n_warmup: int) -> None:
        self.eta, self.n_warmup = eta, n_warmup
        self.sums, self.weights, self.baseline, self.warmup, self.calls = None, None, None, [], 0

    def __call__(self, J: torch.Tensor) -> list[float]:
        m, n = J.shape
        rows = J.tolist()
        if self.sums is None:
            self.sums, self.weights = [[0.0] * n for _ in range(m)], [1.0 / m] * m
        risks = []
        for i in range(m):
            for k in range(n):
                self.sums[i][k] += rows[i][k] ** 2
            risks.append(sum(rows[i][k] ** 2 / math.sqrt(self.sums[i][k] + 1e-7) for k in range(n)))
        self.calls += 1
        if self.calls <= self.n_warmup:
            self.warmup.append(risks)
            return list(self.weights)
        if self.baseline is None:
            if self.warmup:
                self.baseline = [
                    sum(r[i] for r in self.warmup) / len(self.warmup) for i in range(m)
                ]
                relative = [risks[i] / self.baseline[i] for i in range(m)]
            else:
                self.baseline, relative = risks, risks
        else:
            relative = [risks[i] / self.baseline[i] for i in range(m)]
        exponents = [_log(self.weights[i]) + self.eta * relative[i] for i in range(m)]
        unnormalised = [math.exp(x - max(exponents)) for x in exponents]
        self.weights = [x / sum(unnormalised) for x in unnormalised]
        return list(self.weights)


@pytest.mark.parametrize(("eta", "n_warmup"), [(1.0, 0), (0.3, 0), (0.7, 2), (2.0, 5)])
@pytest.mark.parametrize("family", ["normal", "mixed_row_norms", "common_direction"])
def test_follows_the_paper_over_calls(eta: float, n_warmup: int, family: str):
    aggregator, by_hand = ExcessMTL(eta, n_warmup), ExcessMTLByHand(eta, n_warmup)
    for call in range(7):
        J = make(family, 3, 5, seed=call)
        expected = torch.tensor(by_hand(J), dtype=J.dtype)
        torch.testing.assert_close(aggregator(J), expected @ J)


def test_warmup_keeps_uniform_weights():
    weighting = ExcessMTLWeighting(n_warmup_steps=3)
    for seed in range(3):
        assert torch.equal(
            weighting(make("normal", 4, 3, seed=seed)), torch.full((4,), 0.25, dtype=torch.float64)
        )


def test_reset():
    weighting = ExcessMTLWeighting()
    J1, J2 = make("normal", 3, 4, seed=1), make("normal", 3, 4, seed=2)
    first = weighting(J1)
    weighting(J2)
    weighting.reset()
    assert torch.equal(weighting(J1), first)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"robust_step_size": 0.0}, ValueError, "`robust_step_size` must be positive"),
        ({"n_warmup_steps": -1}, ValueError, "`n_warmup_steps` must be non-negative"),
        ({"n_warmup_steps": 1.5}, TypeError, "`n_warmup_steps` must be an int"),
    ],
)
def test_bad_parameters(kwargs: dict, error: type, message: str):
    with pytest.raises(error, match=message):
        ExcessMTL(**kwargs)


def test_repr_and_str():
    assert repr(ExcessMTL()) == "ExcessMTL(robust_step_size=1.0, n_warmup_steps=0)"
    assert str(ExcessMTL()) == "ExcessMTL"
