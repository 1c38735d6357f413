import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.reference.simplex import project_by_bisection
from torchjd.linalg._simplex import project_onto_simplex


@given(m=st.integers(1, 12), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_matches_bisection(m: int, seed: int, scale: float):
    v = scale * torch.randn(m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        project_onto_simplex(v), project_by_bisection(v), atol=1e-10 * max(scale, 1.0), rtol=0
    )


def test_batched_rows():
    V = torch.randn(5, 4, dtype=torch.float64)
    expected = torch.stack([project_onto_simplex(v) for v in V])
    torch.testing.assert_close(project_onto_simplex(V), expected)
    torch.testing.assert_close(
        project_onto_simplex(V).sum(dim=1), torch.ones(5, dtype=torch.float64)
    )


def test_points_of_the_simplex_are_fixed():
    w = torch.tensor([0.2, 0.0, 0.8], dtype=torch.float64)
    torch.testing.assert_close(project_onto_simplex(w), w)
