import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.data.published_mgda import CASES, DEGENERATE_CASES
from tests.reference.aggregators import min_norm_in_hull
from tests.reference.matrices import make
from torchjd.aggregation import MGDA, MGDAWeighting


def frank_wolfe_by_hand(G: np.ndarray, epsilon: float, max_iters: int) -> np.ndarray:
    """Sener & Koltun (2018), Algorithm 2, one step at a time in float64 NumPy."""
    m = len(G)
    w = np.full(m, 1.0 / m)
    for _ in range(max_iters):
        Gw = G @ w
        t = int(np.argmin(Gw))
        a, b, c = w @ Gw, Gw[t], G[t, t]
        denominator = a - 2 * b + c
        gamma = 1.0 if denominator <= 0 else min(max((a - b) / denominator, 0.0), 1.0)  # 0 / 0: 1
        w = (1 - gamma) * w
        w[t] += gamma
        if gamma < epsilon:  # the last step, taken (as the published library does)
            break
    return w


def test_contract_example():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    torch.testing.assert_close(MGDA()(J), torch.tensor([0.0, 1.0, 1.0]))


@pytest.mark.parametrize(
    "family", ["normal", "rank_deficient", "opposite_rows", "common_direction"]
)
@pytest.mark.parametrize(("m", "n"), [(1, 3), (3, 2), (10, 20), (40, 8)])
@pytest.mark.parametrize(("epsilon", "max_iters"), [(0.001, 100), (1e-6, 5), (0.1, 1000)])
def test_follows_the_papers_scheme(family: str, m: int, n: int, epsilon: float, max_iters: int):
    J = make(family, m, n, seed=m)
    G = J @ J.T
    expected = frank_wolfe_by_hand(G.numpy(), epsilon, max_iters)
    weights = MGDAWeighting(epsilon, max_iters)(G)
    np.testing.assert_allclose(weights.numpy(), expected, atol=1e-12)


@settings(max_examples=10)
@given(m=st.integers(1, 8), n=st.integers(1, 8), seed=st.integers(0, 1000))
def test_approaches_the_min_norm_point_of_the_hull(m: int, n: int, seed: int):
    """Frank-Wolfe converges sublinearly: after 2,000 steps the squared norm is within 1e-3 of the
    optimum's (relative to the largest squared row norm)."""
    G = (lambda J: J @ J.T)(make("normal", m, n, seed=seed))
    weights = MGDAWeighting(epsilon=1e-12, max_iters=2_000)(G)
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (weights >= 0).all()
    optimum = min_norm_in_hull(G.numpy())
    value, best = float(weights @ G @ weights), float(optimum @ G.numpy() @ optimum)
    assert best - 1e-9 <= value <= best + 1e-3 * float(G.diagonal().max())


def test_zero_matrix():
    assert torch.equal(MGDA()(torch.zeros(3, 4)), torch.zeros(4))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"epsilon": -1.0}, ValueError, "`epsilon` must be positive"),
        ({"epsilon": 0.0}, ValueError, "`epsilon` must be positive"),
        ({"max_iters": 0}, ValueError, "`max_iters` must be positive"),
        ({"max_iters": 2.5}, TypeError, "`max_iters` must be an int"),
        ({"epsilon": "small"}, TypeError, "`epsilon` must be a float"),
    ],
)
def test_bad_parameters(kwargs: dict, error: type, message: str):
    with pytest.raises(error, match=message):
        MGDA(**kwargs)


def test_repr():
    assert repr(MGDA()) == "MGDA(epsilon=0.001, max_iters=100)"
    assert repr(MGDAWeighting(0.1, 3)) == "MGDAWeighting(epsilon=0.1, max_iters=3)"
    assert str(MGDA()) == "MGDA"


@pytest.mark.parametrize(("J", "expected"), CASES + DEGENERATE_CASES)
def test_agrees_with_the_published_library(J: list[list[int]], expected: list[float]):
    """The published MGDA takes the step whose size falls below ``epsilon``, then stops."""
    G = torch.tensor(J, dtype=torch.float64) @ torch.tensor(J, dtype=torch.float64).T
    np.testing.assert_allclose(MGDAWeighting()(G).numpy(), expected, rtol=0, atol=1e-12)


def test_a_nan_gramian_gives_nan_weights():
    """As in the published library: a NaN is not hidden behind the whole step of a 0 / 0."""
    G = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert MGDAWeighting()(G).isnan().all()
