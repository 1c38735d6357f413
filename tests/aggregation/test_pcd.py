from itertools import combinations

import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import PCD, PCDWeighting


def pcd_by_enumeration(J: torch.Tensor, s: torch.Tensor, tau: list[float]) -> torch.Tensor:
    """Varam et al. (2026), Appendix B.2: every working set of constraints, solved as an
    equality-constrained problem in the rows' space; the best feasible one wins."""
    g = s.unsqueeze(1) * J
    b = torch.tensor([tau[j - 1] * float(g[j] @ g[j]) for j in range(1, len(g))], dtype=J.dtype)
    A = g[1:]
    best, best_value = None, float("inf")
    for size in range(len(A) + 1):
        for S in combinations(range(len(A)), size):
            d = g[0].clone()
            if S:
                A_S = A[list(S)]
                lam = torch.linalg.lstsq(
                    A_S @ A_S.T, (b[list(S)] - A_S @ g[0]).unsqueeze(1)
                ).solution
                d = g[0] + (A_S.T @ lam).squeeze(1)
            if (A @ d >= b - 1e-9 * float(b.abs().max().clamp_min(1))).all():
                value = float(((d - g[0]) ** 2).sum())
                if value < best_value - 1e-12:
                    best, best_value = d, value
    if best is None:
        return J[0].clone()
    if best.norm() <= 1e-12 * g.norm():
        return torch.zeros_like(best)
    return J[0].norm() / best.norm() * best


@pytest.mark.parametrize("family", ["normal", "common_direction", "zero_row", "mixed_row_norms"])
@pytest.mark.parametrize(("m", "tau", "beta"), [(2, 0.5, 0.9), (3, 0.02, 0.999), (4, 0.3, 0.0)])
def test_matches_the_enumeration_over_calls(family: str, m: int, tau: float, beta: float):
    aggregator = PCD(tau=tau, beta=beta, eps=1e-8)
    average = torch.zeros(m, dtype=torch.float64)
    for call in range(1, 4):
        J = make(family, m, 5, seed=call)
        average = beta * average + (1 - beta) * (J**2).sum(dim=1)
        s = (average / (1 - beta**call) + 1e-8).rsqrt()
        expected = pcd_by_enumeration(J, s, [tau] * (m - 1))
        scale = J.norm(dim=1).max()
        torch.testing.assert_close(aggregator(J) / scale, expected / scale, atol=1e-7, rtol=0)


def test_vector_tau():
    J = make("normal", 4, 6)
    tau = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    s = ((J**2).sum(dim=1) + 1e-8).rsqrt()
    torch.testing.assert_close(PCD(tau=tau, beta=0.0)(J), pcd_by_enumeration(J, s, tau.tolist()))


@pytest.mark.parametrize(
    ("J", "expected"),
    [
        (torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, -1, 0]]), torch.tensor([1.0, 0, 0])),
        (torch.zeros(3, 2), torch.zeros(2)),
        (torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.zeros(2)),
    ],
    ids=["infeasible", "zero", "zero_primary"],
)
def test_special_cases(J: torch.Tensor, expected: torch.Tensor):
    torch.testing.assert_close(PCD(tau=0.3)(J), expected)


def test_non_finite_input_leaves_the_average_unchanged():
    weighting = PCDWeighting(beta=0.5)
    J = make("normal", 3, 4)
    weighting(J @ J.T)
    average = weighting.average.clone()
    assert weighting(torch.full((3, 3), torch.nan, dtype=torch.float64)).isnan().all()
    assert torch.equal(weighting.average, average)


def test_reset_and_change_of_size():
    aggregator = PCD(beta=0.5)
    J = make("normal", 3, 4)
    first = aggregator(J)
    aggregator(make("normal", 3, 4, seed=9))
    aggregator.reset()
    assert torch.equal(aggregator(J), first)
    assert aggregator(make("normal", 4, 4)).shape == (4,)


@pytest.mark.parametrize(
    ("kwargs", "m", "error", "message"),
    [
        ({"tau": 1.5}, 3, ValueError, r"`tau` must be in \[0.0, 1.0\]"),
        ({"tau": torch.tensor([0.1, 2.0])}, 3, ValueError, r"`tau` must have entries in \[0, 1\]"),
        ({"tau": torch.tensor([0.1, 0.2])}, 4, ValueError, "`tau` has 2 entries"),
        ({"beta": 1.0}, 3, ValueError, r"`beta` must be in \[0.0, 1.0\)"),
        ({"eps": -1.0}, 3, ValueError, "`eps` must be non-negative"),
    ],
)
def test_bad_inputs(kwargs: dict, m: int, error: type, message: str):
    with pytest.raises(error, match=message):
        PCD(**kwargs)(torch.randn(m, 3))


def test_repr_and_str():
    assert repr(PCD()) == "PCD(tau=0.02, beta=0.999, eps=1e-08)"
    assert str(PCD()) == "PCD"
