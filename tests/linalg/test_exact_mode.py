"""The exact mode of the projector: ``TorchProjector(norm_eps=0.0, reg_eps=0.0)``."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.dual_cone import brute_force_singular, kkt_violation, least_energy_optimum
from tests.reference.matrices import FACTORIES, make
from torchjd.aggregation import DualProj, UPGrad, UPGradWeighting
from torchjd.linalg import TorchProjector

NON_CONFLICT = {torch.float64: 1e-8, torch.float32: 1e-4}


def exact() -> TorchProjector:
    return TorchProjector(norm_eps=0.0, reg_eps=0.0)


def worst_conflict(J: torch.Tensor, d: torch.Tensor) -> float:
    """``min_i J_i · d / (‖J_i‖ max_j ‖J_j‖)``, in float64 (0 for a zero matrix)."""
    J, d = J.double(), d.double()
    norms = J.norm(dim=1)
    if float(norms.max()) == 0.0:
        return 0.0
    return float(((J @ d) / (norms * norms.max()).clamp_min(1e-300)).min())


def hard_matrices(max_m: int = 10, max_n: int = 10):
    return st.builds(
        lambda family, m, n, log_scale, seed: 10**log_scale * make(family, m, n, seed=seed),
        st.sampled_from(sorted(FACTORIES)),
        st.integers(1, max_m),
        st.integers(1, max_n),
        st.floats(-8, 8),
        st.integers(0, 2**16),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aggregator_class", [UPGrad, DualProj])
@given(J=hard_matrices())
def test_never_conflicts(dtype: torch.dtype, aggregator_class: type, J: torch.Tensor):
    J = J.to(dtype)
    d = aggregator_class(projector=exact())(J)
    assert torch.isfinite(d).all()
    assert worst_conflict(J, d) >= -NON_CONFLICT[dtype]


@pytest.mark.parametrize("family", ["normal", "duplicate_rows", "opposite_rows", "mixed_row_norms"])
@pytest.mark.parametrize(("m", "n"), [(24, 8), (40, 20)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_never_conflicts_with_many_more_rows_than_the_rank(
    family: str, m: int, n: int, dtype: torch.dtype
):
    """Highly degenerate problems, where the active-set method alone wanders."""
    J = make(family, m, n, seed=m).to(dtype)
    assert worst_conflict(J, UPGrad(projector=exact())(J)) >= -NON_CONFLICT[dtype]


@pytest.mark.parametrize("shape", [(1, 3), (4, 2), (6, 9)])
def test_zero_jacobian_gives_zero(shape: tuple[int, int]):
    J = torch.zeros(shape)
    d = UPGrad(projector=exact())(J)
    assert torch.equal(d, torch.zeros(shape[1]))
    weights = UPGradWeighting(projector=exact())(J @ J.T)
    torch.testing.assert_close(weights, torch.full((shape[0],), 1 / shape[0]))


@settings(max_examples=15)
@given(J=hard_matrices(), log_factor=st.floats(-8, 8))
def test_scale_invariance(J: torch.Tensor, log_factor: float):
    weighting = UPGradWeighting(projector=exact())
    factor = 10**log_factor
    torch.testing.assert_close(
        weighting((factor * J) @ (factor * J).T), weighting(J @ J.T), rtol=1e-6, atol=1e-8
    )


@settings(max_examples=15)
@given(J=hard_matrices(), seed=st.integers(0, 1000))
def test_permutation_equivariance(J: torch.Tensor, seed: int):
    permutation = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(seed))
    weighting = UPGradWeighting(projector=exact())
    G = J @ J.T
    torch.testing.assert_close(
        weighting(G[permutation][:, permutation]), weighting(G)[permutation], rtol=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("m", [2, 5, 10, 30])
def test_agrees_with_the_defaults_up_to_the_regularisation(m: int):
    """On well-conditioned Jacobians, removing the regularisation ``ε = 1e-4`` (added to the
    Gramian normalised by its trace) moves the weights by about ``ε / λ_min`` relatively."""
    J = make("normal", m, 4 * m, seed=m)
    G = J @ J.T
    default = UPGradWeighting()(G)
    exact_weights = UPGradWeighting(projector=exact())(G)
    smallest_eigenvalue = torch.linalg.eigvalsh(G / G.trace())[0]
    bound = 2 * 1e-4 / smallest_eigenvalue * default.abs().max()
    assert (exact_weights - default).abs().max() <= bound


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize(("m", "n"), [(3, 6), (6, 3), (8, 16)])
def test_kkt_and_least_energy_against_brute_force(family: str, m: int, n: int):
    """Against enumeration of the active sets (m ≤ 8): the update is the unique projection, and
    the weights are, among the optimal ones, those of least ``Σ_j ‖J_j‖² v_j²`` (see
    ``tikhonov`` in torchjd/linalg/_bounded_qp.py), the least-norm choice for rows of equal norms,
    computed independently by quadprog under the constraint that fixes the update.

    (The second check needs a well-separated null space: exact rank deficiency, no singular value
    between 1e-12 and 1e-4 of the largest, and row norms within quadprog's reach.)"""
    J = make(family, m, n, seed=m + n)
    trace = (J * J).sum()
    J = J / trace.sqrt() if trace > 0 else J  # the exact mode normalises G by its trace too
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64) / m
    V = exact()(U, G).numpy()
    for u, v in zip(U.numpy(), V, strict=True):
        optimum = brute_force_singular(G.numpy(), u)
        assert kkt_violation(G.numpy(), u, v) <= 1e-8
        np.testing.assert_allclose(J.T.numpy() @ v, J.T.numpy() @ optimum, atol=1e-7)
        if family == "mixed_row_norms":
            continue
        expected = least_energy_optimum(J.numpy(), u, optimum)
        np.testing.assert_allclose(v, expected, atol=1e-6 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize(
    "family", ["normal", "rank_deficient", "duplicate_rows", "opposite_rows", "mixed_row_norms"]
)
@pytest.mark.parametrize(("m", "n"), [(72, 9), (72, 90)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_never_conflicts_beyond_64_rows(family: str, m: int, n: int, dtype: torch.dtype):
    """Beyond ``m = 64``: pivoting warm-started by ADMM, and the interior point with Woodbury
    solves for the rows it leaves on a Gramian of low rank (here rank ≤ 9)."""
    J = make(family, m, n, seed=m + n).to(dtype)
    J[: m // 8] = J[m // 8 : m // 4] + 1e-6 * J[: m // 8]  # near-duplicate rows
    assert worst_conflict(J, UPGrad(projector=exact())(J)) >= -NON_CONFLICT[dtype]
