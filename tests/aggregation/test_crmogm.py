import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import (
    CRMOGMWeighting,
    GradVacWeighting,
    GramianWeightedAggregator,
    MeanWeighting,
    UPGradWeighting,
    WeightedAggregator,
)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("with_initial", [False, True])
def test_exponential_moving_average_over_calls(alpha: float, with_initial: bool):
    """Zhou et al. (2022): λ_k = α λ_{k−1} + (1 − α) λ̂_k, with λ_0 = initial or λ̂_1."""
    initial = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64) if with_initial else None
    inner = UPGradWeighting()
    weighting = CRMOGMWeighting(UPGradWeighting(), alpha=alpha, initial_weights=initial)
    previous = None if initial is None else initial.clone()
    for seed in range(4):
        J = make("normal", 3, 5, seed=seed)
        new = inner(J @ J.T)
        if previous is None:
            previous = new
        expected = alpha * previous + (1 - alpha) * new
        torch.testing.assert_close(weighting(J @ J.T), expected)
        previous = expected


def test_reset_restarts_and_resets_the_inner_weighting():
    inner = GradVacWeighting()
    weighting = CRMOGMWeighting(inner, alpha=0.5)
    J = make("normal", 3, 4)
    torch.manual_seed(0)
    first = weighting(J @ J.T)
    weighting(J @ J.T)
    assert inner.phi_hat is not None
    weighting.reset()
    assert inner.phi_hat is None
    torch.manual_seed(0)
    assert torch.equal(weighting(J @ J.T), first)


def test_composes_with_both_aggregators():
    J = make("normal", 3, 4)
    torch.testing.assert_close(
        WeightedAggregator(CRMOGMWeighting(MeanWeighting()))(J), J.mean(dim=0)
    )
    upgrad = GramianWeightedAggregator(UPGradWeighting())(J)
    torch.testing.assert_close(
        GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting()))(J), upgrad
    )


def test_alpha_can_change_between_calls():
    weighting = CRMOGMWeighting(
        MeanWeighting(), alpha=1.0, initial_weights=torch.tensor([1.0, 0.0])
    )
    assert torch.equal(weighting(torch.ones(2, 3)), torch.tensor([1.0, 0.0]))
    weighting.alpha = 0.0
    assert torch.equal(weighting(torch.ones(2, 3)), torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"weighting": MeanWeighting(), "alpha": 1.5}, ValueError, r"`alpha` must be in \[0.0"),
        ({"weighting": "mean"}, TypeError, "`weighting` must be a torchjd.aggregation.Weighting"),
        (
            {"weighting": MeanWeighting(), "initial_weights": torch.ones(2, 2)},
            ValueError,
            "`initial_weights` must be a vector",
        ),
    ],
)
def test_bad_parameters(kwargs: dict, error: type, message: str):
    with pytest.raises(error, match=message):
        CRMOGMWeighting(**kwargs)


def test_wrong_length_initial_weights():
    weighting = CRMOGMWeighting(MeanWeighting(), initial_weights=torch.ones(2))
    with pytest.raises(
        ValueError, match="`initial_weights` has 2 entries, so `matrix` must have 2"
    ):
        weighting(torch.ones(3, 2))


def test_repr():
    assert repr(CRMOGMWeighting(MeanWeighting())) == (
        "CRMOGMWeighting(weighting=MeanWeighting(), alpha=0.9, initial_weights=None)"
    )
