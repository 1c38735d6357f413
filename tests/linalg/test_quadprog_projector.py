import pytest
import torch

from tests.data.published_quadprog_projector import CONFIGS, EXPECTED, MATRICES
from torchjd.aggregation import DualProj, UPGrad, UPGradWeighting
from torchjd.linalg import QuadprogProjector, TorchProjector


@pytest.mark.parametrize("backend", ["torch", "quadprog"])
@pytest.mark.parametrize(("matrix", "config"), sorted(EXPECTED))
def test_agrees_with_the_published_library(backend: str, matrix: str, config: str):
    J = torch.tensor(MATRICES[matrix], dtype=torch.float64)
    projector = QuadprogProjector(**CONFIGS[config], backend=backend)
    expected_weights, expected_dualproj = EXPECTED[(matrix, config)]
    torch.testing.assert_close(
        UPGradWeighting(projector=projector)(J @ J.T),
        torch.tensor(expected_weights, dtype=torch.float64),
        rtol=1e-9,
        atol=1e-12,
    )
    torch.testing.assert_close(
        DualProj(projector=projector)(J),
        torch.tensor(expected_dualproj, dtype=torch.float64),
        rtol=1e-9,
        atol=1e-12,
    )


def test_published_usage_runs_unchanged():
    J = torch.tensor(MATRICES["contract"])
    aggregator = UPGrad(projector=QuadprogProjector(reg_eps=1e-5))
    expected = torch.tensor(EXPECTED[("contract", "reg_1e-5")][0]) @ J
    torch.testing.assert_close(aggregator(J), expected)


def test_same_numbers_as_the_torch_projector_with_the_same_eps():
    J = torch.randn(7, 5, dtype=torch.float64)
    G, U = J @ J.T, torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(
        QuadprogProjector(reg_eps=1e-3)(U, G), TorchProjector(reg_eps=1e-3)(U, G)
    )


def test_torch_backend_accepts_zero_regularisation():
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    weights = UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))(J @ J.T)
    assert (J @ (weights @ J) >= -1e-12).all()


@pytest.mark.parametrize("name", ["norm_eps", "reg_eps"])
def test_negative_eps(name: str):
    with pytest.raises(ValueError, match=f"`{name}` must be non-negative. Found {name}=-0.1"):
        QuadprogProjector(**{name: -0.1})


def test_keyword_only_and_backend_check():
    with pytest.raises(TypeError):
        QuadprogProjector(1e-4, 1e-4)  # type: ignore[misc]
    with pytest.raises(ValueError, match='`backend` must be "torch" or "quadprog"'):
        QuadprogProjector(backend="cvxpy")  # type: ignore[arg-type]


def test_repr():
    assert repr(QuadprogProjector()) == "QuadprogProjector(norm_eps=0.0001, reg_eps=0.0001)"
    assert repr(QuadprogProjector(reg_eps=1e-5, backend="quadprog")) == (
        'QuadprogProjector(norm_eps=0.0001, reg_eps=1e-05, backend="quadprog")'
    )
    assert str(UPGrad(projector=QuadprogProjector())) == "UPGrad"
