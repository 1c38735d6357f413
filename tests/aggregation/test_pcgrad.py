import pytest
import torch

from tests.reference.matrices import FACTORIES, make
from torchjd.aggregation import PCGrad, PCGradWeighting


def pcgrad_by_hand(J: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Yu et al. (2020), Algorithm 1, on the rows themselves: each row visits the others in the
    order ``order[i]`` and loses its component along each row it conflicts with."""
    total = torch.zeros_like(J[0])
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in order[i].tolist():
            if j != i and g @ J[j] < 0:
                g = g - (g @ J[j]) / (J[j] @ J[j]) * J[j]
        total += g
    return total


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize(("m", "n"), [(1, 3), (2, 5), (5, 3), (9, 20)])
def test_matches_sequential_projections_on_the_rows(family: str, m: int, n: int):
    J = make(family, m, n, seed=m + n)
    torch.manual_seed(7)
    order = torch.rand(m, m).argsort(dim=1)
    torch.manual_seed(7)
    result = PCGrad()(J)
    expected = pcgrad_by_hand(J, order)
    scale = J.norm(dim=1).max().clamp_min(1e-300)
    torch.testing.assert_close(result / scale, expected / scale, atol=1e-10, rtol=0)


def test_output_does_not_conflict_with_two_rows():
    """With two rows, both projected rows are orthogonal to the other, so the sum conflicts with
    neither row (Yu et al., 2020, Theorem 1 setting)."""
    for seed in range(20):
        J = make("normal", 2, 4, seed=seed)
        d = PCGrad()(J)
        assert (J @ d >= -1e-12).all()


def test_randomness_follows_the_global_generator():
    J = make("normal", 6, 4, seed=3)
    torch.manual_seed(1)
    first = PCGrad()(J)
    torch.manual_seed(1)
    assert torch.equal(PCGrad()(J), first)
    outputs = {tuple(PCGrad()(J).tolist()) for _ in range(10)}
    assert len(outputs) > 1  # the order matters on this matrix


def test_weighting_and_aggregator_agree():
    J = make("common_direction", 4, 6)
    torch.manual_seed(3)
    weights = PCGradWeighting()(J @ J.T)
    torch.manual_seed(3)
    torch.testing.assert_close(PCGrad()(J), weights @ J)


def test_no_conflict_is_the_sum():
    J = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    assert torch.equal(PCGrad()(J), J.sum(dim=0))


def test_repr_and_str():
    assert repr(PCGrad()) == "PCGrad()"
    assert str(PCGrad()) == "PCGrad"
    assert repr(PCGradWeighting()) == "PCGradWeighting()"
