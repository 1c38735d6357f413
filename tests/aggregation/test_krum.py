from itertools import combinations

import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import Krum, KrumWeighting


def krum_by_hand(J: torch.Tensor, f: int, n_selected: int) -> torch.Tensor:
    """Blanchard et al. (2017): scores by brute force over the subsets of m − f − 2 neighbours."""
    m = J.shape[0]
    scores = []
    for i in range(m):
        others = [j for j in range(m) if j != i]
        scores.append(
            min(
                sum(float(((J[i] - J[j]) ** 2).sum()) for j in subset)
                for subset in combinations(others, m - f - 2)
            )
        )
    chosen = sorted(range(m), key=lambda i: scores[i])[:n_selected]
    return J[chosen].mean(dim=0)


@pytest.mark.parametrize(("m", "f", "n_selected"), [(3, 0, 1), (5, 1, 1), (6, 2, 3), (7, 1, 7)])
@pytest.mark.parametrize("family", ["normal", "common_direction", "mixed_row_norms", "zero_row"])
def test_matches_brute_force(m: int, f: int, n_selected: int, family: str):
    J = make(family, m, 4, seed=m + f)
    J[-1] += 50.0  # an outlier
    torch.testing.assert_close(Krum(f, n_selected)(J), krum_by_hand(J, f, n_selected))


def test_ignores_outliers():
    J = torch.cat([make("tiny", 6, 3), 1e3 * torch.ones(2, 3, dtype=torch.float64)])
    assert Krum(n_byzantine=2, n_selected=3)(J).abs().max() < 1e-5


def test_weights_are_an_average():
    J = make("normal", 6, 3)
    weights = KrumWeighting(1, 2)(J @ J.T)
    assert sorted(weights.tolist()) == [0.0] * 4 + [0.5] * 2


@pytest.mark.parametrize(
    ("kwargs", "m", "error", "message"),
    [
        ({"n_byzantine": 1}, 3, ValueError, r"at least n_byzantine \+ 3 = 4 rows. Found 3"),
        ({"n_byzantine": 0, "n_selected": 5}, 4, ValueError, "at least 5 rows. Found 4"),
        ({"n_byzantine": -1}, 4, ValueError, "`n_byzantine` must be non-negative"),
        ({"n_byzantine": 0, "n_selected": 0}, 4, ValueError, "`n_selected` must be positive"),
        ({"n_byzantine": 1.0}, 4, TypeError, "`n_byzantine` must be an int"),
    ],
)
def test_bad_inputs(kwargs: dict, m: int, error: type, message: str):
    with pytest.raises(error, match=message):
        Krum(**kwargs)(torch.randn(m, 2))


def test_repr_and_str():
    assert repr(Krum(1, 2)) == "Krum(n_byzantine=1, n_selected=2)"
    assert str(Krum(1, 2)) == "Krum1-2"
    assert repr(KrumWeighting(1)) == "KrumWeighting(n_byzantine=1, n_selected=1)"
