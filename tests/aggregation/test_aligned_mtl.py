import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import AlignedMTL, AlignedMTLWeighting


def scale(eigenvalues: torch.Tensor, mode: str) -> float:
    positive = sorted(x for x in eigenvalues.tolist() if x > 1e-9 * max(eigenvalues.tolist()))
    if mode == "min":
        return positive[0]
    if mode == "median":
        return positive[(len(positive) - 1) // 2]
    return sum(positive) / len(positive)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize(
    ("family", "m", "n"),
    [("normal", 3, 5), ("normal", 6, 20), ("rank_deficient", 6, 8), ("duplicate_rows", 4, 6),
     ("common_direction", 5, 9), ("huge", 4, 7)],
)  # fmt: skip
def test_balance_transformation_aligns_the_rows(mode: str, family: str, m: int, n: int):
    """Senushkin et al. (2023): the rows of B J are orthogonal with squared norm σ, i.e.
    B G B = σ Π with Π the projector onto the range of G. B is read column by column."""
    J = make(family, m, n, seed=m * n)
    G = J @ J.T
    B = torch.stack(
        [AlignedMTLWeighting(torch.eye(m, dtype=J.dtype)[k], mode)(G) for k in range(m)], dim=1
    )
    sigma = scale(torch.linalg.eigvalsh(G), mode)
    projector = G @ torch.linalg.pinv(G, hermitian=True)
    torch.testing.assert_close(B @ G @ B, sigma * projector, atol=1e-9 * sigma, rtol=0)
    torch.testing.assert_close(B, B.T)


def test_default_preference_is_the_mean():
    J = make("normal", 4, 6)
    expected = AlignedMTLWeighting(torch.full((4,), 0.25, dtype=J.dtype))(J @ J.T)
    torch.testing.assert_close(AlignedMTLWeighting()(J @ J.T), expected)
    torch.testing.assert_close(AlignedMTL()(J), expected @ J)


def test_orthogonal_rows_of_equal_norm_are_unchanged():
    J = 3.0 * torch.eye(3, 5, dtype=torch.float64)
    torch.testing.assert_close(AlignedMTL()(J), J.mean(dim=0))


def test_zero_matrix():
    assert torch.equal(AlignedMTL()(torch.zeros(3, 2)), torch.zeros(2))


@pytest.mark.parametrize(
    ("kwargs", "m", "error", "message"),
    [
        ({"scale_mode": "max"}, 2, ValueError, "`scale_mode` must be one of 'min', 'median'"),
        ({"pref_vector": torch.ones(2)}, 3, ValueError, "`pref_vector` has 2 entries, so `matrix`"),
        ({"pref_vector": torch.ones(2, 2)}, 2, ValueError, "`pref_vector` must be a vector"),
    ],
)
def test_bad_inputs(kwargs: dict, m: int, error: type, message: str):
    with pytest.raises(error, match=message):
        AlignedMTL(**kwargs)(torch.randn(m, 4))


def test_repr_and_str():
    assert repr(AlignedMTL()) == "AlignedMTL(pref_vector=None, scale_mode='min')"
    assert str(AlignedMTL()) == "AlignedMTL"
    assert str(AlignedMTL(torch.tensor([1.0, 2.0]))) == "AlignedMTL([1., 2.])"
