import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import FairGrad, FairGradWeighting, NashMTL

FAMILIES = ["normal", "common_direction", "duplicate_rows", "tiny", "huge", "mixed_row_norms"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("m", "n"), [(1, 3), (2, 5), (5, 20), (16, 40)])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 10.0])
def test_solves_the_fairness_equation(family: str, m: int, n: int, alpha: float):
    """Ban & Ji (2024), Eq. 4: G w = w^(−1/α), w > 0, i.e. w_i^(1/α) g_iᵀd = 1."""
    J = make(family, m, n, seed=m)
    G = J @ J.T
    w = FairGradWeighting(alpha)(G)
    assert (w > 0).all()
    # Row norms over six decades make cond(G) ~ 1e12: G @ w itself is only accurate to ~1e-4.
    atol = 1e-3 if family == "mixed_row_norms" else 1e-6
    residual = w ** (1 / alpha) * (G @ w) - 1
    assert residual.abs().max() <= atol


def test_alpha_one_is_nash_mtl():
    J = make("normal", 4, 7)
    torch.testing.assert_close(FairGrad(1.0)(J), NashMTL(4, max_norm=0.0)(J))


def test_float32():
    J = make("normal", 5, 9, dtype=torch.float32)
    G = J @ J.T
    w = FairGradWeighting(2.0)(G)
    torch.testing.assert_close(w**0.5 * (G @ w), torch.ones(5), atol=1e-4, rtol=0)


def test_max_iters_bounds_the_work():
    J = make("mixed_row_norms", 6, 9)
    one_step = FairGradWeighting(2.0, max_iters=1)(J @ J.T)
    assert not torch.allclose(one_step, FairGradWeighting(2.0)(J @ J.T))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"alpha": 0.0}, ValueError, "`alpha` must be positive"),
        ({"alpha": -1.0}, ValueError, "`alpha` must be positive"),
        ({"alpha": 1.0, "max_iters": 0}, ValueError, "`max_iters` must be positive"),
        ({"alpha": 1.0, "max_iters": 1.5}, TypeError, "`max_iters` must be an int"),
    ],
)
def test_bad_parameters(kwargs: dict, error: type, message: str):
    with pytest.raises(error, match=message):
        FairGrad(**kwargs)


def test_repr_and_str():
    assert repr(FairGrad(2.0)) == "FairGrad(alpha=2.0, max_iters=None)"
    assert str(FairGrad(2.0)) == "2.0-FairGrad"
