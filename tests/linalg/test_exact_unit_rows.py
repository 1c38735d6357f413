"""UPGrad's problems in the exact mode up to ``m = 64``, solved as those of the unit vectors
(``TorchProjector._summed_projections`` through ``_bounded_qp._exact_unit_route``: the least-norm
weights of ``p_i e_i`` are ``p_i v(e_i)``), against the general path of the projector, the KKT
conditions, quadprog on nonsingular Gramians, and, on singular ones, the least-energy weights of an
independent float64 reference (brute-force enumeration of the faces, then quadprog)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.reference.dual_cone import brute_force_singular, kkt_violation, least_energy_optimum
from tests.reference.matrices import FACTORIES, make
from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import TorchProjector, _bounded_qp


def exact() -> TorchProjector:
    return TorchProjector(norm_eps=0.0, reg_eps=0.0)


def spied_unit_route(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = []
    original = _bounded_qp._exact_unit_route

    def spy(G: torch.Tensor, tol: float, max_iters: int) -> torch.Tensor:
        calls.append(G.shape[0])
        return original(G, tol, max_iters)

    monkeypatch.setattr("torchjd.linalg._dual_cone._exact_unit_route", spy)
    return calls


@given(
    family=st.sampled_from(sorted(FACTORIES)),
    m=st.integers(1, 64),
    n=st.integers(1, 80),
    seed=st.integers(0, 2**16),
    with_preference=st.booleans(),
)
def test_weights_are_the_general_path_rows_summed(
    family: str, m: int, n: int, seed: int, with_preference: bool
):
    """The weights are ``p @ V`` for the rows ``V`` that the projector returns for the identity
    (the same routes), in float64 and float32, and meet the KKT conditions of UPGrad's problem:
    ``w ≥ p``, ``G w ≥ 0`` (no conflict), up to the exact mode's tolerance."""
    J = make(family, m, n, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    p = torch.rand(m, generator=generator, dtype=torch.float64) * (torch.rand(m) < 0.8)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        G = (J @ J.T).to(dtype)
        pref = p.to(dtype) if with_preference else None
        weights = UPGradWeighting(pref, projector=exact())(G)
        assert weights.dtype == dtype
        V = exact()(torch.eye(m, dtype=dtype), G)
        expected = V.mean(dim=0) if pref is None else pref @ V
        scale = expected.abs().max().clamp_min(1e-30)
        assert ((weights - expected).abs().max() / scale) <= tol
        G64, w = G.double(), weights.double()
        bound = p if with_preference else torch.full((m,), 1 / m, dtype=torch.float64)
        assert torch.ge(w, bound.to(dtype).double() * (1 - 1e-6)).all()
        norms = G64.diagonal().clamp_min(0).sqrt()
        conflict = (G64 @ w) / (norms * norms.max()).clamp_min(1e-300)
        assert conflict.min() >= -(1e-7 if dtype == torch.float64 else 1e-3) * w.abs().max()


@pytest.mark.parametrize("m", [3, 5, 8])
@pytest.mark.parametrize("family", ["rank_deficient", "duplicate_rows", "opposite_rows", "normal"])
def test_least_energy_weights_of_the_unit_rows(m: int, family: str):
    """Each row ``v(e_i)`` on a singular (or not) Gramian: its update is that of brute-force
    enumeration of the faces (least squares on singular faces), and its weights are the optimal
    ones of least energy ``Σ_j ‖J_j‖² v_j²`` (quadprog on the optimal set)."""
    J = make(family, m, m // 2 + 1 if family == "normal" else 2 * m, seed=m)
    G = J @ J.T
    G_normalised = G / G.trace()
    X = _bounded_qp._exact_unit_route(G_normalised, 1e-9, 10_000)
    J64 = J.numpy()
    for i in range(m):
        u = np.eye(m)[i]
        optimum = brute_force_singular(G.numpy(), u)
        np.testing.assert_allclose(X[i].numpy() @ J64, optimum @ J64, rtol=0, atol=1e-7)
        expected = least_energy_optimum(J64, u, optimum)
        np.testing.assert_allclose(X[i].numpy(), expected, rtol=0, atol=1e-6)
        assert kkt_violation(G.numpy(), u, X[i].numpy()) <= 1e-9


@pytest.mark.parametrize("m", [8, 16, 40, 64])
def test_nonsingular_gramians_match_quadprog(m: int, monkeypatch: pytest.MonkeyPatch):
    from tests.reference.dual_cone import with_quadprog

    calls = spied_unit_route(monkeypatch)
    J = make("mixed_row_norms", m, 2 * m, seed=m)
    G = J @ J.T
    p = torch.linspace(0.1, 1.0, m, dtype=torch.float64)
    weights = UPGradWeighting(p, projector=exact())(G)
    assert calls == [m]
    G_normalised = (G / G.trace()).numpy()
    expected = p.numpy() @ with_quadprog(G_normalised, np.eye(m))
    np.testing.assert_allclose(weights.numpy(), expected, rtol=0, atol=1e-8 * expected.max())


def test_dispatch(monkeypatch: pytest.MonkeyPatch):
    """Up to ``m = 64`` in float32 and float64; not beyond, not in half precision, not for the
    default mode."""
    calls = spied_unit_route(monkeypatch)
    for m, dtype in ((64, torch.float64), (20, torch.float32), (65, torch.float64)):
        J = make("normal", m, m, dtype=dtype)
        UPGradWeighting(projector=exact())(J @ J.T)
    assert calls == [64, 20]
    J = make("normal", 16, 20, dtype=torch.float32)
    UPGradWeighting(projector=exact())((J @ J.T).half())
    UPGradWeighting()(J @ J.T)
    assert calls == [64, 20]


def test_non_finite_and_zero_gramians():
    G = make("normal", 20, 10) @ make("normal", 20, 10).T
    G[3, 4] = G[4, 3] = torch.nan
    assert UPGradWeighting(projector=exact())(G).isnan().all()
    zero = torch.zeros(12, 12, dtype=torch.float64)  # every update is zero: the weights are p
    torch.testing.assert_close(
        UPGradWeighting(projector=exact())(zero), torch.full((12,), 1 / 12).double()
    )
