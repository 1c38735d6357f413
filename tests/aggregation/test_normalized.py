import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.reference.matrices import make
from torchjd.aggregation import (
    GramianWeightedAggregator,
    MeanWeighting,
    MGDAWeighting,
    Normalized,
    UPGrad,
    UPGradWeighting,
)

EDGE = ["normal", "zero_row", "duplicate_rows", "opposite_rows", "mixed_row_norms", "tiny", "huge"]


def _unit_rows(J: torch.Tensor) -> torch.Tensor:
    norms = J.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, J / torch.where(norms > 0, norms, 1.0), 0.0)


@pytest.mark.parametrize("name", EDGE)
@pytest.mark.parametrize("inner", [MeanWeighting(), UPGradWeighting()], ids=["mean", "upgrad"])
def test_combination_is_the_inner_one_of_the_unit_rows(name: str, inner: object):
    J = make(name, 5, 7)
    w = Normalized(inner)(J @ J.T)  # type: ignore[arg-type]
    unit = _unit_rows(J)
    v = inner(unit @ unit.T)  # type: ignore[operator]
    torch.testing.assert_close(w @ J, v @ unit, atol=1e-8, rtol=1e-6)
    norms = J.norm(dim=1)
    torch.testing.assert_close(w * norms, torch.where(norms > 0, v, 0.0), atol=1e-8, rtol=1e-6)


@given(st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4))
def test_invariant_to_rescaling_rows(scales: list[float]):
    J = make("normal", 4, 6, seed=1)
    aggregator = GramianWeightedAggregator(Normalized(UPGradWeighting()))
    scaled = torch.tensor(scales, dtype=torch.float64).unsqueeze(1) * J
    torch.testing.assert_close(aggregator(scaled), aggregator(J), atol=1e-7, rtol=1e-6)


def test_zero_rows_get_zero_weight_and_no_nan():
    J = make("zero_row", 4, 5)
    w = Normalized(UPGradWeighting())(J @ J.T)
    assert w.isfinite().all()
    assert w[2] == 0.0
    zero = torch.zeros(3, 3, dtype=torch.float64)
    assert torch.equal(Normalized(MGDAWeighting())(zero), torch.zeros(3, dtype=torch.float64))


def test_normalizing_makes_upgrad_balanced():
    # a row 1000 times larger dominates UPGrad, not Normalized UPGrad
    J = torch.tensor([[1000.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    direction = GramianWeightedAggregator(Normalized(UPGradWeighting()))(J)
    torch.testing.assert_close(
        direction, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-4, rtol=0
    )
    assert UPGrad()(J)[0] > 100 * UPGrad()(J)[1]


def test_bad_inputs_and_repr():
    with pytest.raises(TypeError, match=r"`weighting` must be a torchjd.aggregation.Weighting"):
        Normalized(lambda G: G)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`gramian` must be a square matrix"):
        Normalized(MeanWeighting())(torch.ones(2, 3))
    assert repr(Normalized(MeanWeighting())) == "Normalized(weighting=MeanWeighting())"
    assert str(Normalized(MeanWeighting())) == "Normalized(MeanWeighting)"
