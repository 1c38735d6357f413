"""UPGrad's weights on a Gramian that requires grad: attached to its graph, with a finite gradient
that matches a central difference along perturbations that keep the Jacobian's row relations
(``J + t J R``: zero, duplicate and opposite rows stay so, the rank stays), on the hard Jacobians
of ``benchmarks/non_conflict.py`` where the backward pass raised or returned NaN; and the solver's
own tracked steps (still taken by the default mode, and by direct calls on a tracked ``G``)."""

import pytest
import torch
from benchmarks.non_conflict import hard_jacobian
from torch import Tensor

from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import TorchProjector
from torchjd.linalg._enumeration import _active_sets
from torchjd.linalg._low_rank import low_rank_factor
from torchjd.linalg._principal_pivoting import _spd_factor, _spd_solve


def _exact() -> UPGradWeighting:
    return UPGradWeighting(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))


def _drawn(m: int, draw: int) -> Tensor:
    """The ``draw``-th hard Jacobian of the stream of seed ``7000 + m`` (float64)."""
    g = torch.Generator().manual_seed(7000 + m)
    for _ in range(draw):
        hard_jacobian(m, g)
    return hard_jacobian(m, g)


def _check_gradient(
    weighting: UPGradWeighting, J: Tensor, seed: int = 0, difference: bool = True
) -> None:
    """The weights require grad, their gradient is finite and (with ``difference``) its
    directional derivative along ``J R`` matches a central difference."""
    g = torch.Generator().manual_seed(seed)
    m, n = J.shape
    D = J @ torch.randn(n, n, generator=g, dtype=J.dtype) / n**0.5
    c = torch.randn(m, generator=g, dtype=J.dtype)
    G = (J @ J.T).requires_grad_()
    w = weighting(G)
    assert w.requires_grad
    (c @ w).backward()
    assert G.grad is not None
    assert bool(torch.isfinite(G.grad).all())
    if not difference:
        return
    derivative = (G.grad * (D @ J.T + J @ D.T)).sum()
    h = 1e-5

    def at(t: float) -> Tensor:
        return c @ weighting((J + t * D) @ (J + t * D).T)

    central = (at(h) - at(-h)) / (2 * h)
    torch.testing.assert_close(derivative, central, rtol=1e-3, atol=1e-8 * float(c.abs().sum()))


@pytest.mark.parametrize(
    ("m", "draw", "difference"),
    [
        (16, 10, True),  # no conflict: the unit rows, built without the graph (raised)
        (64, 2, True),  # zero-update Newton route: its where's mask changed in place (raised)
        (100, 12, True),  # range route of the fallback: factors updated in place (raised)
        (40, 16, True),  # zero rows: eigh's backward NaN on the equal zero eigenvalues
        # A failed face factor's backward NaN in the interior point's polish. Finite only: weights
        # up to 5e5 (near-duplicate rows) whose values are too noisy for a central difference
        # (from -1.5e5 to 1.8e6 at steps 1e-4 to 1e-6).
        (40, 46, False),
    ],
)
def test_exact_weighting_gradient_on_hard_jacobians(m: int, draw: int, difference: bool):
    _check_gradient(_exact(), _drawn(m, draw), difference=difference)


@pytest.mark.parametrize(("exact", "m"), [(True, 5), (False, 70), (True, 70)])
def test_constant_weights_stay_attached(exact: bool, m: int):
    """No conflict (every entry of ``G`` positive) or a zero Gramian: the weights are constant,
    ``p`` (here the mean), and come back in the graph with a zero gradient (they were built
    without it, and ``backward`` raised)."""
    weighting = _exact() if exact else UPGradWeighting()
    g = torch.Generator().manual_seed(m)
    positive = torch.rand(m, 3, generator=g, dtype=torch.float64) + 1.0
    for J in (positive, torch.zeros(m, 3, dtype=torch.float64)):
        G = (J @ J.T).requires_grad_()
        w = weighting(G)
        torch.testing.assert_close(w, torch.full_like(w, 1.0 / m))
        w.sum().backward()
        assert G.grad is not None
        assert bool((G.grad == 0).all())


@pytest.mark.parametrize("m", [8, 16, 40])
def test_default_weighting_below_norm_eps_has_zero_gradient(m: int):
    """The default mode replaces a Gramian of trace below ``norm_eps`` by zero: the weights are
    then the mean, whose gradient is zero (it was NaN: the division by False's 0 / 0)."""
    J = torch.randn(m, 5, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    G = (1e-5 * J @ J.T / (J * J).sum()).requires_grad_()
    w = UPGradWeighting()(G)
    w.sum().backward()
    assert G.grad is not None
    assert bool((G.grad == 0).all())


def test_low_rank_factor_gradient_with_equal_eigenvalues():
    """Zero rows give equal (zero) eigenvalues, whose pairs made eigh's backward NaN; the kept
    factor's gradient is finite and matches a central difference along ``J + t J R``."""
    g = torch.Generator().manual_seed(0)
    J = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0]])
    J = torch.cat([J, torch.zeros(1, 3)]).double()  # eigenvalues 0, 0, 0 exactly
    D = J @ torch.randn(3, 3, generator=g, dtype=torch.float64)
    c = torch.randn(5, 5, generator=g, dtype=torch.float64)

    def energy(G: Tensor) -> Tensor:
        L = low_rank_factor(G, 4)
        assert L is not None
        return (c * (L @ L.T)).sum() + (L * L).sum(dim=0).max()

    G = (J @ J.T).requires_grad_()
    energy(G).backward()
    assert G.grad is not None
    assert bool(torch.isfinite(G.grad).all())
    derivative = (G.grad * (D @ J.T + J @ D.T)).sum()
    h = 1e-6
    with torch.no_grad():
        difference = (energy((J + h * D) @ (J + h * D).T) - energy((J - h * D) @ (J - h * D).T)) / (
            2 * h
        )
    torch.testing.assert_close(derivative, difference, rtol=1e-5, atol=1e-8)


def test_failed_face_factor_has_no_nan_gradient():
    """A batch of face systems, one singular (its factor fails): the values are those of the
    untracked solve, and the gradient through the other one is that of its own solve, finite."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    good = A @ A.T + torch.eye(3, dtype=torch.float64)
    singular = torch.zeros(3, 3, dtype=torch.float64)
    singular[0, 0] = 1.0
    b = torch.randn(2, 3, generator=g, dtype=torch.float64)
    K = torch.stack([good, singular]).requires_grad_()
    x = _spd_solve(_spd_factor(K), b)
    with torch.no_grad():
        untracked = _spd_solve(_spd_factor(K), b)
    torch.testing.assert_close(x, untracked, equal_nan=True, rtol=0, atol=0)
    torch.where(torch.tensor([[True], [False]]), x, 0.0).sum().backward()
    assert K.grad is not None
    assert bool(torch.isfinite(K.grad).all())
    alone = good.clone().requires_grad_()
    torch.linalg.solve(alone, b[0]).sum().backward()
    assert alone.grad is not None
    # (the factor reads one triangle: its gradient is the symmetric part)
    torch.testing.assert_close(K.grad[0] + K.grad[0].T, alone.grad + alone.grad.T)
    assert bool((K.grad[1] == 0).all())


def test_tracked_call_after_an_untracked_one():
    """The enumeration's cached active sets, first made by an untracked call (in inference mode),
    are saved by a later tracked call's backward (which raised; the default mode's tracked calls
    run the solver's own steps, up to m = 8 the enumeration)."""
    _active_sets.cache_clear()
    weighting = UPGradWeighting()
    J = torch.randn(6, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    weighting(J @ J.T)
    _check_gradient(weighting, J)


@pytest.mark.parametrize("seed", range(6))
def test_exact_projector_gradient_for_general_rows(seed: int):
    """Rows ``U`` other than UPGrad's (random signs): the solver leaves some active entries an ulp
    above ``u_j``; read as free, their face was the wrong one and the gradient was off (by up to
    185% on easy nonsingular Gramians). Directional derivative against a central difference."""
    g = torch.Generator().manual_seed(seed)
    m, n = 6, 15
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    J += 0.5 * torch.randn(1, n, generator=g, dtype=torch.float64)  # rows in conflict or not
    U = torch.randn(3, m, generator=g, dtype=torch.float64)
    D = torch.randn(m, n, generator=g, dtype=torch.float64)
    projector = TorchProjector(norm_eps=0.0, reg_eps=0.0)
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    V = projector(U, (J + t * D) @ (J + t * D).T)
    derivative = torch.stack([torch.autograd.grad(v, t, retain_graph=True)[0] for v in V.flatten()])
    h = 1e-6
    with torch.no_grad():
        plus = projector(U, (J + h * D) @ (J + h * D).T)
        minus = projector(U, (J - h * D) @ (J - h * D).T)
    torch.testing.assert_close(
        derivative, ((plus - minus) / (2 * h)).flatten(), rtol=1e-5, atol=1e-6
    )


def test_non_finite_gramian_gives_nan_weights_in_the_graph():
    """A NaN in ``J``: NaN weights, as untracked, in the graph (the face's eigh raised)."""
    J = torch.randn(4, 6, dtype=torch.float64)
    J[0, 0] = torch.nan
    J.requires_grad_()
    w = _exact()(J @ J.T)
    assert w.requires_grad
    assert bool(w.isnan().all())
    w.sum().backward()
    assert J.grad is not None
