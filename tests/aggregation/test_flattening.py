import pytest
import torch

from torchjd.aggregation import (
    Flattening,
    GeneralizedWeighting,
    MeanWeighting,
    UPGradWeighting,
)


def _generalized_gramian(J: torch.Tensor) -> torch.Tensor:
    """G[i1..ik, jk..j1] = <J[i1..ik], J[j1..jk]>, built entry by entry (the definition)."""
    shape = J.shape[:-1]
    k = len(shape)
    G = torch.empty((*shape, *shape[::-1]), dtype=J.dtype)
    for i in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, k).tolist():
        for j in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, k).tolist():
            G[(*i, *j[::-1])] = J[tuple(i)] @ J[tuple(j)]
    return G


@pytest.mark.parametrize("shape", [(4,), (2, 3), (3, 1, 2)])
def test_equals_the_weighting_of_the_flattened_gramian(shape: tuple[int, ...]):
    J = torch.randn(*shape, 6, dtype=torch.float64)
    flat = J.reshape(-1, 6)
    for weighting in [UPGradWeighting(), MeanWeighting()]:
        weights = Flattening(weighting)(_generalized_gramian(J))
        assert weights.shape == shape
        torch.testing.assert_close(weights, weighting(flat @ flat.T).reshape(shape))


def test_bad_generalized_gramians():
    flattening = Flattening(MeanWeighting())
    with pytest.raises(
        ValueError, match=r"shape \[m1, \.\.\., mk, mk, \.\.\., m1\].*\(2, 3, 2, 3\)"
    ):
        flattening(torch.ones(2, 3, 2, 3))
    with pytest.raises(ValueError, match=r"Found `generalized_gramian.shape = \(2, 2, 2\)`"):
        flattening(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match=r"Found `generalized_gramian.shape = \(\)`"):
        flattening(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"`generalized_gramian` must have a floating-point dtype"):
        flattening(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"`generalized_gramian` must be a torch.Tensor"):
        flattening([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`gramian` must be symmetric"):
        Flattening(UPGradWeighting())(torch.tensor([[1.0, 5.0], [0.0, 1.0]]).reshape(1, 2, 2, 1))
    with pytest.raises(TypeError, match=r"`weighting` must be a torchjd.aggregation.Weighting"):
        Flattening(object())  # type: ignore[arg-type]


def test_generalized_weighting_is_a_subclassable_base():
    with pytest.raises(TypeError, match="abstract"):
        GeneralizedWeighting()  # type: ignore[abstract]

    class Diagonal(GeneralizedWeighting):
        def forward(self, generalized_gramian: torch.Tensor, /) -> torch.Tensor:
            k = generalized_gramian.ndim // 2
            flat = generalized_gramian.reshape(generalized_gramian.shape[:k].numel(), -1)
            return flat.diagonal().reshape(generalized_gramian.shape[:k])

    G = _generalized_gramian(torch.randn(2, 3, 4, dtype=torch.float64))
    assert Diagonal()(G).shape == (2, 3)
    assert repr(Flattening(MeanWeighting())) == "Flattening(weighting=MeanWeighting())"
