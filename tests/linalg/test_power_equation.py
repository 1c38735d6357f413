import pytest
import torch

from tests.reference.matrices import make
from torchjd.linalg._power_equation import solve_power_equation


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_solves_and_is_scale_equivariant(p: float, scale: float):
    J = make("normal", 6, 10)
    G = J @ J.T
    x = solve_power_equation(scale * G, p, max_iters=100)
    torch.testing.assert_close(
        x**p * (scale * G @ x), torch.ones(6, dtype=G.dtype), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(x, solve_power_equation(G, p, 100) * scale ** (-1 / (1 + p)))


def test_orthogonal_rows_are_solved_by_the_start():
    G = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    torch.testing.assert_close(
        solve_power_equation(G, 1.0, max_iters=1),
        torch.tensor([1.0, 0.5, 1 / 3], dtype=torch.float64),
    )
