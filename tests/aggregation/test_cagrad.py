import pytest
import torch

from tests.reference.matrices import make
from torchjd.aggregation import CAGrad, CAGradWeighting


def certificate(J: torch.Tensor, weights: torch.Tensor, c: float) -> tuple[float, float]:
    """Liu et al. (2021): by weak duality, any d with ‖d − g0‖ ≤ c‖g0‖ and any w in the simplex
    satisfy min_i g_iᵀd ≤ g_wᵀg0 + c‖g0‖‖g_w‖, with equality only at the optimum. The output
    gives d = Jᵀweights and w ∝ weights − 1/m. Returns the gap and the excess of ‖d − g0‖ over
    the radius, both relative to ‖J‖²."""
    m = J.shape[0]
    b = torch.full((m,), 1.0 / m, dtype=J.dtype)
    g0 = b @ J
    d = weights @ J
    w = (weights - b) / (weights - b).sum()
    assert (w >= -1e-12).all()
    g_w = w @ J
    dual = g_w @ g0 + c * g0.norm() * g_w.norm()
    primal = (J @ d).min()
    scale = float((J**2).sum())
    return float(dual - primal) / scale, float((d - g0).norm() - c * g0.norm()) / scale


FAMILIES = ["normal", "duplicate_rows", "rank_deficient", "common_direction", "huge"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("m", "n"), [(2, 5), (8, 20), (30, 100)])
@pytest.mark.parametrize("c", [0.1, 0.5, 0.9])
def test_zero_duality_gap(family: str, m: int, n: int, c: float):
    J = make(family, m, n, seed=m + n)
    weights = CAGradWeighting(c)(J @ J.T)
    gap, excess = certificate(J, weights, c)
    assert -1e-12 <= gap <= 1e-9
    assert excess <= 1e-12


@pytest.mark.parametrize(("m", "n"), [(8, 20), (20, 10)])
def test_mixed_row_norms_are_close_to_optimal(m: int, n: int):
    """Row norms over six decades (cond(G) ~ 1e12): the gap is small but not at rounding level."""
    J = make("mixed_row_norms", m, n, seed=1)
    gap, excess = certificate(J, CAGradWeighting(0.5)(J @ J.T), 0.5)
    assert -1e-12 <= gap <= 1e-4
    assert excess <= 1e-12


def test_matches_a_grid_search_on_two_rows():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 2.0]], dtype=torch.float64)
    c = 0.4
    g0 = J.mean(dim=0)
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    W = torch.stack([t, 1 - t], dim=1)
    F = (W @ J) @ g0 + c * g0.norm() * (W @ J).norm(dim=1)
    w = W[F.argmin()]
    expected = 0.5 + c * g0.norm() / (w @ J).norm() * w
    torch.testing.assert_close(CAGradWeighting(c)(J @ J.T), expected, atol=1e-4, rtol=0)


def test_contract_example():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    torch.testing.assert_close(
        CAGradWeighting(0.5)(J @ J.T), torch.tensor([0.7041, 0.5]), atol=1e-4, rtol=0
    )


def test_undefined_correction_gives_zero():
    """With a zero row, F(e_zero) = 0 ≤ F(w) for these rows: the optimum has g_w = 0, the
    direction g_w / ‖g_w‖ of the correction is undefined, and the output is zero."""
    J = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(CAGrad(0.5)(J), torch.zeros(2, dtype=torch.float64))


def test_zero_c_is_the_mean():
    J = make("normal", 5, 3)
    torch.testing.assert_close(CAGrad(0.0)(J), J.mean(dim=0))


def test_scale_invariant_weights():
    J = make("normal", 6, 4)
    G = J @ J.T
    torch.testing.assert_close(CAGradWeighting(0.5)(G), CAGradWeighting(0.5)(1e6 * G))


def test_below_norm_eps_is_zero():
    J = 1e-4 * make("normal", 3, 4)
    assert torch.equal(CAGrad(0.5)(J), torch.zeros(4, dtype=J.dtype))
    assert CAGrad(0.5, norm_eps=0.0)(J).abs().max() > 0


def test_float32():
    J = make("normal", 8, 20, dtype=torch.float32)
    weights = CAGradWeighting(0.5)(J @ J.T)
    gap, _ = certificate(J.double(), weights.double(), 0.5)
    assert abs(gap) <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"c": -1.0}, ValueError, "`c` must be non-negative. Found c=-1.0"),
        ({"c": float("nan")}, ValueError, "`c` must be non-negative"),
        ({"c": "big"}, TypeError, "`c` must be a float"),
        ({"c": 0.5, "norm_eps": -1.0}, ValueError, "`norm_eps` must be non-negative"),
    ],
)
def test_bad_parameters(kwargs: dict, error: type, message: str):
    with pytest.raises(error, match=message):
        CAGrad(**kwargs)


def test_repr_and_str():
    assert repr(CAGrad(0.5)) == "CAGrad(c=0.5, norm_eps=0.0001)"
    assert str(CAGrad(0.5)) == "CAGrad0.5"
    assert repr(CAGradWeighting(0.5)) == "CAGradWeighting(c=0.5, norm_eps=0.0001)"
