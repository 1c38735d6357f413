import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.reference.aggregators import dualproj_weights, upgrad_weights
from tests.reference.matrices import FACTORIES, make
from torchjd.aggregation import DualProj, DualProjWeighting, UPGrad, UPGradWeighting
from torchjd.linalg import TorchProjector

CONTRACT_J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def test_numerical_contract():
    torch.testing.assert_close(
        UPGrad()(CONTRACT_J), torch.tensor([0.2929, 1.9004, 1.9004]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        UPGradWeighting()(CONTRACT_J @ CONTRACT_J.T),
        torch.tensor([1.1109, 0.7894]),
        atol=1e-4,
        rtol=0,
    )


SIZES = [(1, 5), (2, 1), (3, 7), (8, 3), (16, 40), (40, 1000), (64, 20)]


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize(("m", "n"), SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upgrad_matches_primal_reference(family: str, m: int, n: int, dtype: torch.dtype):
    """Weights from the paper's definition, computed in the primal by a generic QP solver."""
    J = make(family, m, n, seed=m + n)
    expected = upgrad_weights(J.numpy())
    weights = UPGradWeighting()((J @ J.T).to(dtype)).double().numpy()
    scale = np.abs(expected).max()
    tolerance = 1e-8 if dtype == torch.float64 else 5e-4
    np.testing.assert_allclose(weights, expected, atol=tolerance * scale, rtol=0)


@pytest.mark.parametrize("family", ["normal", "rank_deficient", "opposite_rows", "mixed_row_norms"])
@pytest.mark.parametrize(("m", "n"), [(2, 3), (9, 4), (30, 60)])
def test_dualproj_matches_primal_reference(family: str, m: int, n: int):
    J = make(family, m, n, seed=m * n)
    pref = torch.rand(m, dtype=torch.float64)
    expected = dualproj_weights(J.numpy(), pref.numpy())
    weights = DualProjWeighting(pref)(J @ J.T).numpy()
    np.testing.assert_allclose(weights, expected, atol=1e-8 * np.abs(expected).max(), rtol=0)


def test_upgrad_with_preference_matches_reference():
    J = make("normal", 6, 4)
    pref = torch.tensor([0.0, 1.0, 2.0, 0.5, 0.25, 3.0], dtype=torch.float64)
    expected = upgrad_weights(J.numpy(), pref.numpy())
    np.testing.assert_allclose(UPGradWeighting(pref)(J @ J.T).numpy(), expected, atol=1e-9)


def test_custom_regularisation_matches_reference():
    J = make("rank_deficient", 7, 5)
    projector = TorchProjector(norm_eps=0.0, reg_eps=1e-2)
    expected = upgrad_weights(J.numpy(), norm_eps=0.0, reg_eps=1e-2)
    np.testing.assert_allclose(UPGradWeighting(projector=projector)(J @ J.T).numpy(), expected)


def matrices(max_m: int = 12, max_n: int = 12):
    return st.builds(
        lambda m, n, log_scale, seed, family: 10**log_scale * make(family, m, n, seed=seed),
        st.integers(1, max_m),
        st.integers(1, max_n),
        st.floats(-3, 3),
        st.integers(0, 2**16),
        st.sampled_from(sorted(FACTORIES)),
    )


@pytest.mark.parametrize("aggregator_class", [UPGrad, DualProj])
@given(J=matrices())
def test_non_conflict_up_to_the_regularisation(aggregator_class: type, J: torch.Tensor):
    """The projector solves ``min vᵀG'v, v ≥ u`` with ``G' = G / tr G + εI``: its optimality
    ``G'w ≥ 0`` gives ``J_i · d = (G w)_i ≥ −ε tr(G) w_i`` (plus the solver's tolerance)."""
    aggregator = aggregator_class()
    d = aggregator(J)
    w = aggregator.gramian_weighting(J @ J.T)
    trace = (J * J).sum()
    if trace < 1e-4:  # below norm_eps, the Gramian is treated as zero: no projection at all
        torch.testing.assert_close(d, J.mean(dim=0))
        return
    lower_bound = -trace * (1e-4 * w + 1e-6)
    assert (J @ d >= lower_bound).all()
    assert (w >= 0).all()


@pytest.mark.parametrize("weighting_class", [UPGradWeighting, DualProjWeighting])
@given(J=matrices(), seed=st.integers(0, 1000))
def test_permutation_equivariance(weighting_class: type, J: torch.Tensor, seed: int):
    m = J.shape[0]
    permutation = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    G = J @ J.T
    weights = weighting_class()(G)
    permuted = weighting_class()(G[permutation][:, permutation])
    torch.testing.assert_close(permuted, weights[permutation], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("aggregator_class", [UPGrad, DualProj])
@given(J=matrices(), log_factor=st.floats(-2, 2))
def test_positive_homogeneity(aggregator_class: type, J: torch.Tensor, log_factor: float):
    factor = 10**log_factor
    trace = (J * J).sum()
    if min(trace, trace * factor**2) < 1e-3:  # below norm_eps the Gramian is set to zero
        return
    aggregator = aggregator_class()
    torch.testing.assert_close(
        aggregator(factor * J), factor * aggregator(J), atol=1e-9 * factor, rtol=1e-7
    )


def test_weights_are_at_least_the_preference():
    J = make("opposite_rows", 10, 6)
    pref = torch.linspace(0.0, 1.0, 10, dtype=torch.float64)
    weights = UPGradWeighting(pref)(J @ J.T)
    assert (weights >= pref).all()
    assert (DualProjWeighting(pref)(J @ J.T) >= pref).all()


def test_opposite_rows_give_zero():
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    torch.testing.assert_close(UPGrad()(J), torch.zeros(2), atol=1e-4, rtol=0)


def test_small_gradients_below_norm_eps_give_the_mean():
    """The published semantics: a trace below ``norm_eps`` switches the projection off."""
    J = 1e-3 * torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    torch.testing.assert_close(UPGrad()(J), J.mean(dim=0))


@pytest.mark.parametrize("cls", [UPGradWeighting, DualProjWeighting])
def test_pref_vector_errors(cls: type):
    with pytest.raises(ValueError, match=r"`pref_vector` must have non-negative entries"):
        cls(torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match=r"`pref_vector` must be a vector \(1-D tensor\)"):
        cls(torch.ones(2, 2))
    with pytest.raises(ValueError, match="`pref_vector` must have finite entries"):
        cls(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="`pref_vector` must have a floating-point dtype"):
        cls(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"`pref_vector` must be a 1-D torch\.Tensor"):
        cls([0.5, 0.5])
    weighting = cls(torch.tensor([0.2, 0.3, 0.5]))
    with pytest.raises(
        ValueError, match="`pref_vector` has 3 entries, so `matrix` must have 3 rows"
    ):
        weighting(torch.eye(2))
    weighting(torch.eye(3))  # still usable after the error


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_projector_type_error(cls: type):
    with pytest.raises(
        TypeError, match=r"`projector` must be a torchjd\.linalg\.DualConeProjector"
    ):
        cls(projector="quadprog")


def test_pref_vector_follows_the_module_and_the_input_dtype():
    aggregator = UPGrad(torch.tensor([1.0, 2.0]))
    assert aggregator.gramian_weighting.pref_vector.dtype == torch.float32
    out = aggregator(CONTRACT_J.double())
    assert out.dtype == torch.float64
    aggregator.double()
    assert aggregator.gramian_weighting.pref_vector.dtype == torch.float64
    assert "pref_vector" not in aggregator.state_dict()
    assert len(aggregator.state_dict()) == 0


def test_nan_propagates():
    J = CONTRACT_J.clone()
    J[0, 0] = float("nan")
    assert UPGrad()(J).isnan().all()
    assert DualProj()(J).isnan().all()


def test_repr_and_str():
    pref = torch.tensor([0.12345, 2.0])
    assert repr(UPGrad()) == (
        "UPGrad(pref_vector=None, projector=TorchProjector(norm_eps=0.0001, reg_eps=0.0001))"
    )
    assert str(UPGrad()) == "UPGrad"
    assert str(UPGrad(pref)) == "UPGrad([0.12, 2.])"
    assert str(DualProj(pref)) == "DualProj([0.12, 2.])"
    assert repr(DualProjWeighting(projector=TorchProjector(reg_eps=0.0))) == (
        "DualProjWeighting(pref_vector=None, "
        "projector=TorchProjector(norm_eps=0.0001, reg_eps=0.0))"
    )
    assert repr(UPGrad(pref)).startswith("UPGrad(pref_vector=tensor([0.1235, 2.0000]), projector=")
