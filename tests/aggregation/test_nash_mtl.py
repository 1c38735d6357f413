import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import NashMTL

FAMILIES = ["normal", "common_direction", "duplicate_rows", "tiny", "huge", "mixed_row_norms"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("m", "n"), [(1, 3), (2, 5), (5, 20), (16, 40)])
def test_bargaining_solution(family: str, m: int, n: int):
    """Navon et al. (2022), Theorem 5.1: α_i g_iᵀd = 1 for every task, with d = Jᵀα."""
    J = make(family, m, n, seed=m)
    d = NashMTL(m, max_norm=0.0)(J)
    # the weights themselves (with duplicate rows, Jᵀα = d does not determine them)
    alpha = NashMTL(m, max_norm=0.0).gramian_weighting(J @ J.T)
    torch.testing.assert_close(alpha @ J, d)
    torch.testing.assert_close(alpha * (J @ d), torch.ones(m, dtype=J.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(d.norm() ** 2, torch.tensor(float(m), dtype=J.dtype))


def test_max_norm_clips():
    J = make("normal", 4, 6)
    unclipped = NashMTL(4, max_norm=0.0)(J)
    clipped = NashMTL(4, max_norm=1.0)(J)
    torch.testing.assert_close(clipped, unclipped / unclipped.norm())
    torch.testing.assert_close(NashMTL(4, max_norm=10.0)(J), unclipped)


def test_weights_are_reused_between_updates():
    J1, J2 = make("normal", 3, 5, seed=1), make("normal", 3, 5, seed=2)
    aggregator = NashMTL(3, max_norm=0.0, update_weights_every=2)
    fresh = NashMTL(3, max_norm=0.0)
    first = aggregator(J1)
    alpha = torch.linalg.lstsq(J1.T, first.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(aggregator(J2), alpha @ J2)  # second call: same weights
    torch.testing.assert_close(aggregator(J2), fresh(J2))  # third call: recomputed
    aggregator.reset()
    torch.testing.assert_close(aggregator(J2), fresh(J2))


def test_zero_rows_stay_finite():
    for J in [
        torch.zeros(3, 4),
        torch.tensor([[1.0, 2.0], [-1.0, -2.0]]),
        torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
    ]:
        assert torch.isfinite(NashMTL(J.shape[0])(J)).all()


@pytest.mark.parametrize(
    ("kwargs", "m", "error", "message"),
    [
        ({"n_tasks": 2}, 3, ValueError, "`n_tasks=2`, so the matrix must have 2 rows. Found 3"),
        ({"n_tasks": 0}, 3, ValueError, "`n_tasks` must be positive"),
        ({"n_tasks": 2, "max_norm": -1.0}, 2, ValueError, "`max_norm` must be non-negative"),
        ({"n_tasks": 2, "update_weights_every": 0}, 2, ValueError, "`update_weights_every` must"),
        ({"n_tasks": 2, "optim_niter": 0}, 2, ValueError, "`optim_niter` must be positive"),
    ],
)
def test_bad_inputs(kwargs: dict, m: int, error: type, message: str):
    with pytest.raises(error, match=message):
        NashMTL(**kwargs)(torch.randn(m, 4))


def test_repr_and_str():
    assert (
        repr(NashMTL(3))
        == "NashMTL(n_tasks=3, max_norm=1.0, update_weights_every=1, optim_niter=20)"
    )
    assert str(NashMTL(3)) == "NashMTL"
