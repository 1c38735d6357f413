import torch
from hypothesis import given
from hypothesis import strategies as st

from torchjd.linalg._simplex import project_onto_simplex


def _bisection_projection(x: torch.Tensor) -> torch.Tensor:
    """Π(x) = max(x − τ, 0) with Σ max(x − τ, 0) = 1, τ found by bisection (float64)."""
    low, high = float(x.min()) - 1.0, float(x.max())
    for _ in range(200):
        tau = (low + high) / 2
        if float((x - tau).clamp_min(0).sum()) > 1:
            low = tau
        else:
            high = tau
    return (x - (low + high) / 2).clamp_min(0)


@given(st.lists(st.floats(-10.0, 10.0), min_size=1, max_size=12))
def test_against_bisection(entries: list[float]):
    x = torch.tensor(entries, dtype=torch.float64)
    projection = project_onto_simplex(x)
    torch.testing.assert_close(projection, _bisection_projection(x), atol=1e-10, rtol=0)
    assert (projection >= 0).all()
    torch.testing.assert_close(projection.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_points_of_the_simplex_are_fixed():
    for point in [
        torch.tensor([1.0, 0.0, 0.0]),
        torch.tensor([0.2, 0.3, 0.5]),
        torch.tensor([1.0]),
    ]:
        torch.testing.assert_close(project_onto_simplex(point), point)
