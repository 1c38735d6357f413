import pytest
import torch
from torch import Tensor

from tests.reference.matrices import make
from torchjd.aggregation import UPGrad
from torchjd.linalg import DualConeProjector, PSDMatrix, TorchProjector
from torchjd.linalg._bounded_qp import solve_lower_bounded_qp


def test_defaults_normalise_and_regularise():
    J = make("normal", 5, 3)
    G = J @ J.T
    U = torch.rand(4, 5, dtype=torch.float64)
    expected = solve_lower_bounded_qp(G / G.trace() + 1e-4 * torch.eye(5, dtype=G.dtype), U)
    torch.testing.assert_close(TorchProjector()(U, G), expected)


def test_vector_and_matrix_inputs():
    J = make("normal", 4, 6)
    U = torch.rand(3, 4, dtype=torch.float64)
    projector = TorchProjector()
    batch = projector(U, J @ J.T)
    assert batch.shape == (3, 4)
    torch.testing.assert_close(projector(U[1], J @ J.T), batch[1])


@pytest.mark.parametrize("factor", [1e-2, 1e3])
def test_scale_invariance(factor: float):
    J = make("normal", 6, 6)
    U = torch.eye(6, dtype=torch.float64)
    projector = TorchProjector()
    torch.testing.assert_close(projector(U, factor * (J @ J.T)), projector(U, J @ J.T))


def test_unregularised_mode_solves_the_raw_problem():
    """On a singular Gramian the weights are not unique, but their image ``Jᵀv`` is."""
    J = make("rank_deficient", 6, 4)
    G = J @ J.T
    U = torch.eye(6, dtype=torch.float64)
    V = TorchProjector(norm_eps=0.0, reg_eps=0.0)(U, G)
    assert (V >= U).all()
    torch.testing.assert_close(V @ J, solve_lower_bounded_qp(G, U) @ J)


@pytest.mark.parametrize("name", ["norm_eps", "reg_eps"])
def test_bad_eps(name: str):
    with pytest.raises(ValueError, match=f"`{name}` must be non-negative. Found {name}=-1"):
        TorchProjector(**{name: -1.0})
    with pytest.raises(ValueError, match=f"`{name}` must be non-negative"):
        TorchProjector(**{name: float("nan")})
    with pytest.raises(TypeError, match=f"`{name}` must be a float"):
        TorchProjector(**{name: "1e-4"})


def test_eps_are_keyword_only():
    with pytest.raises(TypeError):
        TorchProjector(1e-4)  # type: ignore[misc]


def test_bad_shapes():
    projector = TorchProjector()
    with pytest.raises(ValueError, match=r"`G` must be a square matrix \[m, m\]"):
        projector(torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"`U` must have shape \[m\] or \[k, m\] with m = 2"):
        projector(torch.ones(3), torch.eye(2))


def test_repr():
    assert repr(TorchProjector(reg_eps=1e-5)) == "TorchProjector(norm_eps=0.0001, reg_eps=1e-05)"


def test_user_projector_plugs_into_upgrad():
    class Identity(DualConeProjector):
        def __call__(self, U: Tensor, G: PSDMatrix) -> Tensor:
            return U

    J = torch.randn(3, 5)
    torch.testing.assert_close(UPGrad(projector=Identity())(J), J.mean(dim=0))
