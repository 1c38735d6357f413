import pytest
import torch

from tests.reference.matrices import make
from tests.reference.simplex import project_by_bisection
from torchjd.aggregation import SDMGradWeighting


class SDMGradByHand:
    """Xiao et al. (2023), Algorithm 1's inner loop, one SGD-with-momentum step at a time."""

    def __init__(self, lr: float, momentum: float, n_iter: int, lambda_: float) -> None:
        self.lr, self.momentum, self.n_iter, self.lambda_ = lr, momentum, n_iter, lambda_
        self.w = None

    def __call__(self, A: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
        m = A.shape[0]
        s = sum(max(float(A[i, i]), 0.0) ** 0.5 for i in range(m)) / m
        A = A / (s**2 if s > 0 else 1.0)
        w = torch.full((m,), 1.0 / m, dtype=A.dtype) if self.w is None else self.w
        velocity = torch.zeros(m, dtype=A.dtype)
        for _ in range(self.n_iter):
            gradient = A @ w + self.lambda_ * (A @ pref)
            velocity = self.momentum * velocity + gradient
            w = project_by_bisection(w - self.lr * velocity)
        self.w = w
        return (w + self.lambda_ * pref) / (1 + self.lambda_)


@pytest.mark.parametrize(
    ("lr", "momentum", "n_iter", "lambda_"),
    [(10.0, 0.5, 20, 0.3), (0.05, 0.7, 5, 0.5), (0.5, 0.0, 3, 0.0)],
)
@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("with_pref", [False, True])
def test_follows_the_inner_loop_over_calls(
    lr: float, momentum: float, n_iter: int, lambda_: float, m: int, with_pref: bool
):
    pref = (
        torch.linspace(1, 2, m, dtype=torch.float64) / torch.linspace(1, 2, m).sum()
        if with_pref
        else None
    )
    weighting = SDMGradWeighting(lr, momentum, n_iter, lambda_, pref)
    by_hand = SDMGradByHand(lr, momentum, n_iter, lambda_)
    for call in range(3):
        J1, J2 = (
            make("common_direction", m, 8, seed=2 * call),
            make("common_direction", m, 8, seed=2 * call + 1),
        )
        A = J1 @ J2.T
        expected = by_hand(A, torch.full((m,), 1.0 / m, dtype=A.dtype) if pref is None else pref)
        torch.testing.assert_close(weighting(A), expected, atol=1e-9, rtol=0)


def test_reset():
    weighting = SDMGradWeighting(lr=0.1, n_iter=2)
    A = make("normal", 3, 3) + 3 * torch.eye(3, dtype=torch.float64)
    first = weighting(A)
    assert not torch.equal(weighting(A), first)
    weighting.reset()
    assert torch.equal(weighting(A), first)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": 0.0}, ValueError, "`lr` must be positive"),
        ({"momentum": 1.0}, ValueError, r"`momentum` must be in \[0.0, 1.0\)"),
        ({"n_iter": 0}, ValueError, "`n_iter` must be positive"),
        ({"lambda_": -0.1}, ValueError, "`lambda_` must be non-negative"),
    ],
)
def test_bad_parameters(kwargs: dict, error: type, message: str):
    with pytest.raises(error, match=message):
        SDMGradWeighting(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="`pref_vector` has 2 entries, so `matrix` must have 2"):
        SDMGradWeighting(pref_vector=torch.ones(2))(torch.eye(3))
    with pytest.raises(ValueError, match=r"`matrix` must be a square matrix \[m, m\]"):
        SDMGradWeighting()(torch.ones(2, 3))


def test_repr():
    assert repr(SDMGradWeighting()) == (
        "SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3, pref_vector=None)"
    )
