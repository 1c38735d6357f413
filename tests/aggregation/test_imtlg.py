import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import IMTLG, IMTLGWeighting


@pytest.mark.parametrize(
    "family", ["normal", "common_direction", "tiny", "huge", "mixed_row_norms"]
)
@pytest.mark.parametrize(("m", "n"), [(1, 3), (2, 5), (4, 9), (8, 30)])
def test_equal_projections_on_the_unit_rows(family: str, m: int, n: int):
    """Liu et al. (2021): the update has the same projection on every unit gradient, and the
    weights sum to one."""
    J = make(family, m, n, seed=m)
    d = IMTLG()(J)
    weights = IMTLGWeighting()(J @ J.T)
    units = J / J.norm(dim=1, keepdim=True)
    projections = units @ d
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=J.dtype))
    scale = projections.abs().max()
    atol = 1e-5 if family == "mixed_row_norms" else 1e-7  # row norms over 6 decades: cond(G) ~ 1e12
    torch.testing.assert_close(
        projections / scale,
        projections.mean() / scale * torch.ones_like(projections),
        atol=atol,
        rtol=0,
    )
    torch.testing.assert_close(d, weights @ J)


def test_closed_form_of_the_paper():
    """Liu et al. (2021), Eq. (7), in the form α = −g_m Uᵀ (D Uᵀ)⁻¹ with D = [g_i − g_m] and
    U = [u_i − u_m] (i < m): then d = g_m + α D has (d · (u_i − u_m)) = 0."""
    J = make("normal", 4, 6, seed=2)
    U = J / J.norm(dim=1, keepdim=True)
    D = J[:-1] - J[-1]
    Ud = U[:-1] - U[-1]
    alpha = -J[-1] @ Ud.T @ torch.linalg.inv(D @ Ud.T)
    expected = torch.cat([alpha, 1 - alpha.sum().unsqueeze(0)])
    torch.testing.assert_close(IMTLGWeighting()(J @ J.T), expected)


def test_duplicate_rows_share_the_weight():
    J = make("duplicate_rows", 4, 6)
    d = IMTLG()(J)
    units = J / J.norm(dim=1, keepdim=True)
    projections = units @ d
    torch.testing.assert_close(projections, projections[0] * torch.ones_like(projections))


@pytest.mark.parametrize(
    "J",
    [torch.zeros(3, 4), torch.tensor([[1.0, 2.0], [-1.0, -2.0]])],
    ids=["zero", "opposite"],
)
def test_no_direction_gives_zero(J: torch.Tensor):
    assert torch.equal(IMTLG()(J), torch.zeros(J.shape[1]))


def test_zero_row_gets_no_weight():
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(IMTLGWeighting()(J @ J.T), torch.tensor([1.0, 0.0]))


def test_repr_and_str():
    assert repr(IMTLG()) == "IMTLG()"
    assert str(IMTLG()) == "IMTLG"
