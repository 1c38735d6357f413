"""The first step of :func:`~torchjd.linalg._small_pivoting.unit_small_pivoting` on faces that
partition the indices (the per-sample Gramians of a classifier: the rows of a class share their
face), solved from one ``m × m`` factorisation (``_Faces.solve_groups``), against brute force
(the groups and whether they partition the indices), quadprog (Goldfarb-Idnani's dual method, an
independent algorithm) and the block route that it replaces."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchjd.linalg._small_pivoting as small_pivoting_module
from tests.linalg.test_small_pivoting import regularised
from tests.linalg.test_unit_rows import assert_unit_rows_optimal
from tests.reference.dual_cone import with_quadprog
from torchjd.aggregation import UPGradWeighting
from torchjd.linalg._bounded_qp import _small_unit_route
from torchjd.linalg._small_pivoting import _groups


def class_jacobian(m: int, classes: int, noise: float, seed: int) -> torch.Tensor:
    """Per-sample gradients of a classifier, roughly: the (centred, hence conflicting) mean
    gradient of each sample's class plus noise, row norms over a decade."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 3 * m, generator=g, dtype=torch.float64)
    means -= means.mean(dim=0)
    labels = torch.randperm(m, generator=g) % classes
    J = means[labels] + noise * torch.randn(m, 3 * m, generator=g, dtype=torch.float64)
    return J * 10 ** (torch.rand(m, 1, generator=g, dtype=torch.float64) - 0.5)


def spy_on_group_solves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times ``_Faces.solve_groups`` is called, recorded in the returned list."""
    calls = []
    solve_groups = small_pivoting_module._Faces.solve_groups
    counted = lambda self, *args: calls.append(1) or solve_groups(self, *args)  # noqa: E731
    monkeypatch.setattr(small_pivoting_module._Faces, "solve_groups", counted)
    return calls


def brute_force_groups(active: np.ndarray) -> tuple[np.ndarray, bool]:
    """The groups (``i ~ j`` when the faces share more than half of the larger one) and whether
    they are an equivalence relation, by loops over the indices."""
    m = len(active)
    sizes = active.sum(axis=1)
    groups = np.zeros((m, m), dtype=bool)
    for i in range(m):
        for j in range(m):
            groups[i, j] = 2 * np.logical_and(active[i], active[j]).sum() > max(sizes[i], sizes[j])
    transitive = all(
        not (groups[i, j] and groups[j, k]) or groups[i, k]
        for i in range(m)
        for j in range(m)
        for k in range(m)
    )
    symmetric = (groups == groups.T).all()
    return groups, bool(transitive and symmetric and groups.diagonal().all())


@st.composite
def faces(draw: st.DrawFn) -> np.ndarray:
    """Boolean ``[m, m]`` faces holding their own index: a partition into classes with some
    entries flipped (none, or a few: near-partitions), or arbitrary."""
    m = draw(st.integers(1, 10))
    if draw(st.booleans()):
        labels = np.array(draw(st.lists(st.integers(0, 3), min_size=m, max_size=m)))
        active = labels[:, None] == labels[None, :]
        flips = draw(st.lists(st.tuples(st.integers(0, m - 1), st.integers(0, m - 1)), max_size=3))
        for i, j in flips:
            active[i, j] = not active[i, j]
    else:
        bits = draw(st.lists(st.booleans(), min_size=m * m, max_size=m * m))
        active = np.array(bits).reshape(m, m)
    np.fill_diagonal(active, True)
    return active


@given(faces())
def test_groups_match_brute_force(active: np.ndarray):
    groups, sizes, group_sizes, paths = _groups(torch.from_numpy(active))
    expected, partition = brute_force_groups(active)
    np.testing.assert_array_equal(groups.numpy(), expected)
    np.testing.assert_array_equal(sizes.numpy(), active.sum(axis=1))
    np.testing.assert_array_equal(group_sizes.numpy(), expected.sum(axis=1))
    assert (float(paths) == float((group_sizes**2).sum())) == partition


@pytest.mark.parametrize(
    ("m", "classes", "noise", "seed"),
    [(25, 5, 0.1, 0), (40, 5, 0.1, 0), (40, 5, 0.1, 2), (64, 5, 0.1, 0), (64, 10, 0.1, 1)],
)
def test_group_route_matches_quadprog(
    m: int, classes: int, noise: float, seed: int, monkeypatch: pytest.MonkeyPatch
):
    """Class-structured Gramians whose guessed faces partition the indices (right at once, or
    not: (40, 5, 0.1, 2) and (64, 5, 0.1, 0) need more steps): every row optimal."""
    calls = spy_on_group_solves(monkeypatch)
    G = regularised(class_jacobian(m, classes, noise, seed))
    X, solved = _small_unit_route(G, 1e-7)
    assert calls == [1]
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)


@pytest.mark.parametrize(("m", "seed"), [(40, 0), (40, 2), (64, 0), (64, 3)])
def test_group_route_agrees_with_block_route(m: int, seed: int, monkeypatch: pytest.MonkeyPatch):
    """The optimum is unique: the same rows (to rounding) as the block route, taken when the
    groups are not said to partition the indices."""
    G = regularised(class_jacobian(m, 5, 0.1, seed))
    X, solved = _small_unit_route(G, 1e-7)

    def never_a_partition(active: torch.Tensor):
        groups, sizes, group_sizes, paths = _groups(active)
        return groups, sizes, group_sizes, paths + 1.0

    calls = spy_on_group_solves(monkeypatch)
    monkeypatch.setattr(small_pivoting_module, "_groups", never_a_partition)
    X_block, solved_block = _small_unit_route(G, 1e-7)
    assert calls == []
    assert solved.all()
    assert solved_block.all()
    torch.testing.assert_close(X, X_block, rtol=1e-12, atol=1e-12 * float(X_block.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upgrad_weighting_on_class_gramians(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch):
    """UPGrad's weights through the group route: those of quadprog (the mean of ``v(e_i)``) on
    the regularised Gramian, formed in the Gramian's dtype (as the projector forms it)."""
    calls = spy_on_group_solves(monkeypatch)
    J = class_jacobian(64, 10, 0.1, 1)
    gramian = (J @ J.T).to(dtype)
    weights = UPGradWeighting()(gramian)
    assert calls == [1]
    assert weights.dtype == dtype
    G = gramian / gramian.trace() + 1e-4 * torch.eye(64, dtype=dtype)
    expected = with_quadprog(G.double().numpy(), np.eye(64)).mean(axis=0)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(weights.double().numpy(), expected, rtol=tolerance, atol=0)
