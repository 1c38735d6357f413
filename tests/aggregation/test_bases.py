"""The bases, their composition, and the checks at the public boundary."""

import pytest
import torch
from torch import Tensor

from torchjd.aggregation import (
    MGDA,
    Aggregator,
    Constant,
    ConstantWeighting,
    DualProj,
    DualProjWeighting,
    GramianWeightedAggregator,
    Mean,
    MeanWeighting,
    MGDAWeighting,
    Random,
    RandomWeighting,
    Sum,
    SumWeighting,
    UPGrad,
    UPGradWeighting,
    WeightedAggregator,
    Weighting,
)
from torchjd.linalg import Matrix, PSDMatrix

AGGREGATORS = [
    UPGrad(),
    UPGrad(torch.tensor([1.0, 2.0, 3.0])),
    DualProj(),
    MGDA(),
    Mean(),
    Sum(),
    Constant(torch.tensor([1.0, -1.0, 2.0])),
    Random(),
    GramianWeightedAggregator(UPGradWeighting()),
    WeightedAggregator(MeanWeighting()),
]
GRAMIAN_WEIGHTINGS = [UPGradWeighting(), DualProjWeighting(), MGDAWeighting()]
WEIGHTINGS = [*GRAMIAN_WEIGHTINGS, MeanWeighting(), SumWeighting(), RandomWeighting()]


@pytest.mark.parametrize("aggregator", AGGREGATORS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_and_dtype(aggregator: Aggregator, dtype: torch.dtype):
    J = torch.randn(3, 5, dtype=dtype)
    out = aggregator(J)
    assert out.shape == (5,)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("aggregator", AGGREGATORS, ids=str)
def test_weighted_aggregators_combine_rows_with_their_weights(aggregator: Aggregator):
    if not isinstance(aggregator, WeightedAggregator):
        pytest.skip("not weighted")
    J = torch.randn(3, 5, dtype=torch.float64)
    torch.manual_seed(0)
    weights = aggregator.weighting(J)
    torch.manual_seed(0)
    torch.testing.assert_close(aggregator(J), weights @ J)


@pytest.mark.parametrize("aggregator", AGGREGATORS, ids=str)
@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (torch.ones(3), ValueError, r"`matrix` must be a matrix \(2-D tensor"),
        (torch.ones(2, 3, 4), ValueError, r"`matrix` must be a matrix \(2-D tensor"),
        (torch.ones(0, 3), ValueError, "`matrix` must have at least one row"),
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "`matrix` must have a floating-point"),
        ([[1.0, 2.0]], TypeError, "`matrix` must be a torch.Tensor"),
    ],
)
def test_bad_matrices(aggregator: Aggregator, bad: object, error: type, message: str):
    with pytest.raises(error, match=message):
        aggregator(bad)


@pytest.mark.parametrize("weighting", GRAMIAN_WEIGHTINGS, ids=str)
def test_bad_gramians(weighting: Weighting):
    with pytest.raises(ValueError, match=r"`gramian` must be a square matrix \[m, m\]"):
        weighting(torch.ones(2, 3))
    with pytest.raises(ValueError, match="`gramian` must be symmetric"):
        weighting(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="`gramian` must have at least one row"):
        weighting(torch.ones(0, 0))
    J = torch.randn(2, 3)
    weighting(J @ J.T)  # rounding asymmetry of a computed Gramian is accepted


@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=str)
def test_weights_have_one_entry_per_row(weighting: Weighting):
    J = torch.randn(4, 6)
    assert weighting(J @ J.T).shape == (4,)


def test_composition():
    J = torch.randn(3, 4)
    composed = UPGradWeighting() << (lambda matrix: matrix @ matrix.T)
    torch.testing.assert_close(composed(J), UPGradWeighting()(J @ J.T))
    assert str(composed) == "UPGradWeighting"
    twice = MeanWeighting() << (lambda x: x) << (lambda x: 2 * x)
    torch.testing.assert_close(twice(J), torch.full((3,), 1 / 3))
    bad = UPGradWeighting() << (lambda matrix: matrix)  # not a Gramian: checked
    with pytest.raises(ValueError, match="`gramian` must be a square matrix"):
        bad(J)


def test_gramian_weighted_aggregator_exposes_its_weighting():
    weighting = DualProjWeighting()
    aggregator = GramianWeightedAggregator(weighting)
    assert aggregator.gramian_weighting is weighting
    assert repr(aggregator) == f"GramianWeightedAggregator(gramian_weighting={weighting!r})"
    assert (
        repr(WeightedAggregator(SumWeighting())) == "WeightedAggregator(weighting=SumWeighting())"
    )


def test_hooks_see_the_weights_and_the_output():
    """Monitoring pattern: forward hooks on the aggregator and on its weighting."""
    seen = {}
    aggregator = UPGrad()
    aggregator.weighting.register_forward_hook(lambda _m, _i, out: seen.update(weights=out))
    aggregator.gramian_weighting.register_forward_hook(lambda _m, _i, out: seen.update(inner=out))
    aggregator.register_forward_hook(lambda _m, _i, out: seen.update(output=out))
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    output = aggregator(J)
    assert torch.equal(seen["output"], output)
    assert torch.equal(seen["weights"], seen["inner"])
    torch.testing.assert_close(seen["weights"] @ J, output)


def test_user_defined_weighting():
    class FirstRow(Weighting[PSDMatrix]):
        def forward(self, gramian: PSDMatrix, /) -> Tensor:
            weights = torch.zeros(gramian.shape[0], dtype=gramian.dtype)
            weights[0] = 1.0
            return weights

    J = torch.randn(3, 2)
    assert torch.equal(GramianWeightedAggregator(FirstRow())(J), J[0])
    assert repr(FirstRow()) == "FirstRow()"

    class Scaled(Weighting[Matrix]):
        def forward(self, matrix: Matrix, /) -> Tensor:
            return torch.ones(matrix.shape[0]) / matrix.abs().sum()

    assert WeightedAggregator(Scaled())(J).shape == (2,)


def test_user_defined_aggregator():
    class First(Aggregator):
        def forward(self, matrix: Matrix, /) -> Tensor:
            return matrix[0]

    assert str(First()) == "First"
    assert repr(First()) == "First()"
    with pytest.raises(ValueError, match="`matrix` must have at least one row"):
        First()(torch.ones(0, 2))


def test_abstract_bases_cannot_be_instantiated():
    with pytest.raises(TypeError):
        Aggregator()  # type: ignore[abstract]
    with pytest.raises(TypeError):
        Weighting()  # type: ignore[abstract]


def test_constant_weighting_in_gramian_aggregator():
    J = torch.randn(2, 3)
    aggregator = GramianWeightedAggregator(ConstantWeighting(torch.tensor([1.0, 2.0])))
    torch.testing.assert_close(aggregator(J), J[0] + 2 * J[1])


@pytest.mark.parametrize("aggregator", [UPGrad(), DualProj(), MGDA(), Mean()], ids=str)
def test_aggregators_inside_autocast_compute_in_the_input_dtype(aggregator: Aggregator):
    """Called inside ``torch.autocast`` (a training step under mixed precision, with a gradient
    scaler's large values), an aggregator computes as outside it: in float32, not in float16,
    where the Gramian's entries (here ~1e10) overflow."""
    torch.manual_seed(0)
    J = 1e4 * torch.randn(3, 5)
    G = J @ J.T
    expected = aggregator(J)
    with torch.autocast("cpu", dtype=torch.float16):
        inside = aggregator(J)
        weights = UPGradWeighting()(G)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    torch.testing.assert_close(weights, UPGradWeighting()(G), rtol=0, atol=0)
