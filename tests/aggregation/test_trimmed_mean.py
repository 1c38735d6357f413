import pytest
import torch

from tests.reference.matrices import FACTORIES, make
from torchjd.aggregation import TrimmedMean


def trimmed_mean_by_hand(J: torch.Tensor, t: int) -> torch.Tensor:
    """Each column sorted as a Python list, its ends dropped, the rest averaged."""
    columns = []
    for k in range(J.shape[1]):
        values = sorted(J[:, k].tolist())
        kept = values[t : len(values) - t]
        columns.append(sum(kept) / len(kept))
    return torch.tensor(columns, dtype=J.dtype)


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize(("m", "t"), [(1, 0), (3, 1), (6, 2), (9, 4)])
def test_matches_sorting_each_column(family: str, m: int, t: int):
    J = make(family, m, 5, seed=m)
    torch.testing.assert_close(TrimmedMean(t)(J), trimmed_mean_by_hand(J, t))


def test_zero_trim_is_the_mean():
    J = make("normal", 4, 3)
    torch.testing.assert_close(TrimmedMean(0)(J), J.mean(dim=0))


def test_robust_to_outliers():
    J = torch.tensor([[1.0], [2.0], [3.0], [1e9], [-1e9]])
    assert torch.equal(TrimmedMean(1)(J), torch.tensor([2.0]))


@pytest.mark.parametrize(
    ("t", "m", "error", "message"),
    [
        (1, 2, ValueError, r"at least 2 \* trim_number \+ 1 = 3 rows. Found 2"),
        (-1, 3, ValueError, "`trim_number` must be non-negative. Found trim_number=-1"),
        (0.5, 3, TypeError, "`trim_number` must be an int"),
    ],
)
def test_bad_inputs(t: object, m: int, error: type, message: str):
    with pytest.raises(error, match=message):
        TrimmedMean(t)(torch.randn(m, 2))  # type: ignore[arg-type]


def test_repr_and_str():
    assert repr(TrimmedMean(2)) == "TrimmedMean(trim_number=2)"
    assert str(TrimmedMean(2)) == "TM2"
