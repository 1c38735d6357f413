import pytest
import torch

from tests.reference.matrices import make
from torchjd import Stateful
from torchjd.aggregation import GradNorm, GradNormWeighting

F64 = torch.float64


class _ReferenceGradNorm:
    """Chen et al. (2018): one step of autograd on L_grad (target held constant), renormalised."""

    def __init__(self, alpha: float, lr: float) -> None:
        self.alpha, self.lr = alpha, lr
        self.w: torch.Tensor | None = None
        self.L0: torch.Tensor | None = None

    def __call__(self, J: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        m = J.shape[0]
        if self.w is None:
            self.w, self.L0 = torch.ones(m, dtype=J.dtype), losses
        current = self.w.clone()
        w = self.w.clone().requires_grad_()
        G = w * torch.stack([J[i].norm() for i in range(m)])  # ‖∇ w_i L_i‖ = w_i ‖∇ L_i‖, w ≥ 0
        L_tilde = losses / self.L0
        r = L_tilde / L_tilde.mean()
        target = (G.mean() * r**self.alpha).detach()
        L_grad = (G - target).abs().sum()
        (grad,) = torch.autograd.grad(L_grad, w)
        updated = (w.detach() - self.lr * grad).clamp_min(0)
        self.w = m * updated / updated.sum()
        return current


@pytest.mark.parametrize(("alpha", "lr"), [(1.5, 0.025), (0.0, 0.1), (3.0, 0.5)])
def test_against_the_paper_over_several_steps_and_after_reset(alpha: float, lr: float):
    weighting = GradNormWeighting(alpha=alpha, lr=lr)
    assert isinstance(weighting, Stateful)
    for _ in range(2):  # the second round runs after reset(): it must replay identically
        reference = _ReferenceGradNorm(alpha, lr)
        losses = torch.tensor([2.0, 1.0, 0.5, 4.0], dtype=F64)
        generator = torch.Generator().manual_seed(0)
        for step in range(8):
            J = make("mixed_row_norms", 4, 5, seed=step)
            weighting.record_losses(losses)
            torch.testing.assert_close(weighting(J @ J.T), reference(J, losses))
            losses = losses * (0.5 + torch.rand(4, generator=generator, dtype=F64))
        weighting.reset()


def test_equalises_the_weighted_gradient_norms():
    J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    aggregator = GradNorm(alpha=1.5, lr=0.01)
    for _ in range(300):
        aggregator.record_losses(torch.tensor([1.0, 1.0], dtype=F64))  # equal training rates
        direction = aggregator(J)
    torch.testing.assert_close(
        direction, torch.tensor([4 / 3, 4 / 3], dtype=F64), atol=0.05, rtol=0
    )


def test_bad_inputs():
    weighting = GradNormWeighting()
    with pytest.raises(RuntimeError, match=r"call `record_losses\(losses\)` before each call"):
        weighting(torch.eye(2))
    weighting.record_losses(torch.ones(2))
    weighting(torch.eye(2))
    with pytest.raises(RuntimeError, match=r"call `record_losses\(losses\)` before each call"):
        weighting(torch.eye(2))  # the losses are consumed by each call
    with pytest.raises(
        ValueError, match=r"`losses` must keep the shape of the first losses, \(2,\)"
    ):
        weighting.record_losses(torch.ones(3))
    weighting.record_losses(torch.ones(2))
    with pytest.raises(ValueError, match=r"the Gramian must be \[2, 2\]. Found \(3, 3\)"):
        weighting(torch.eye(3))
    with pytest.raises(TypeError, match=r"`losses` must be a 1-D floating-point torch.Tensor"):
        weighting.record_losses(torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"`alpha` must be non-negative"):
        GradNormWeighting(alpha=-1.0)
    with pytest.raises(ValueError, match=r"`lr` must be positive"):
        GradNormWeighting(lr=0.0)
    aggregator = GradNorm()
    aggregator.record_losses(torch.ones(2))
    aggregator(torch.eye(2))
    aggregator.reset()
    aggregator.record_losses(torch.ones(3))  # a new shape after reset
    assert aggregator(torch.eye(3)).shape == (3,)


def test_repr():
    assert repr(GradNormWeighting()) == "GradNormWeighting(alpha=1.5, lr=0.025)"
    assert repr(GradNorm(alpha=1.0)) == "GradNorm(alpha=1.0, lr=0.025)"
