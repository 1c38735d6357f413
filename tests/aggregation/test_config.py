import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import ConFIG


@pytest.mark.parametrize(
    ("family", "m", "n"),
    [("normal", 2, 5), ("normal", 5, 20), ("common_direction", 4, 9), ("huge", 3, 7),
     ("mixed_row_norms", 4, 10), ("tiny", 3, 4)],
)  # fmt: skip
@pytest.mark.parametrize("pref", [None, "ramp"])
def test_prescribed_cosines_and_length(family: str, m: int, n: int, pref: str | None):
    """Liu et al. (2024), Eq. 2: cos(g_i, d) ∝ p_i, and |d| = Σ g_i · d / |d|."""
    J = make(family, m, n, seed=m + n)
    p = None if pref is None else torch.arange(1, m + 1, dtype=J.dtype)
    d = ConFIG(p)(J)
    cosines = (J @ d) / (J.norm(dim=1) * d.norm())
    target = torch.ones(m, dtype=J.dtype) if p is None else p
    torch.testing.assert_close(cosines / cosines[0], target / target[0])
    torch.testing.assert_close(d.norm(), (J @ d).sum() / d.norm())


def test_no_conflict_with_default_preference():
    for seed in range(10):
        J = make("normal", 4, 6, seed=seed)
        assert (J @ ConFIG()(J) >= -1e-12).all()


def test_zero_rows():
    assert torch.equal(ConFIG()(torch.zeros(3, 2)), torch.zeros(2))
    torch.testing.assert_close(
        ConFIG()(torch.tensor([[1.0, 0.0], [0.0, 0.0]])), torch.tensor([1.0, 0.0])
    )


def test_wrong_length_preference():
    with pytest.raises(
        ValueError, match="`pref_vector` has 2 entries, so `matrix` must have 2 rows"
    ):
        ConFIG(torch.ones(2))(torch.randn(3, 4))


def test_repr_and_str():
    assert repr(ConFIG()) == "ConFIG(pref_vector=None)"
    assert str(ConFIG(torch.tensor([1.0, 2.0]))) == "ConFIG([1., 2.])"
