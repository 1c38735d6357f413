import pytest
import torch

from torchjd import Stateful
from torchjd.scalarization import FAMO

F64 = torch.float64


class _ReferenceFAMO:
    """Liu et al. (2023), Algorithm 1, with torch.optim.Adam on the logits (as the authors do)."""

    def __init__(self, K: int, min_losses: torch.Tensor, lr: float, weight_decay: float) -> None:
        self.xi = torch.zeros(K, dtype=F64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.xi], lr=lr, weight_decay=weight_decay)
        self.min_losses = min_losses
        self.previous: torch.Tensor | None = None

    def gradient_weights(self, L: torch.Tensor) -> torch.Tensor:
        """The weights c·z_i / (L_i − L_i*) of the gradients ∇L_i in the paper's update."""
        self.previous = L
        z = torch.softmax(self.xi.detach(), dim=0)
        gaps = L - self.min_losses + 1e-8
        c = 1 / (z / gaps).sum()
        return c * z / gaps

    def update(self, L_next: torch.Tensor) -> None:
        assert self.previous is not None
        z = torch.softmax(self.xi, dim=0)
        d = (self.previous - self.min_losses + 1e-8).log() - (L_next - self.min_losses + 1e-8).log()
        (delta,) = torch.autograd.grad(z, self.xi, grad_outputs=d)  # (∂z/∂ξ)ᵀ d
        self.optimizer.zero_grad()
        self.xi.grad = delta
        self.optimizer.step()


@pytest.mark.parametrize(
    ("lr", "weight_decay", "with_min"), [(0.025, 0.001, False), (0.3, 0.1, True)]
)
def test_against_algorithm_1_over_several_steps_and_after_reset(
    lr: float, weight_decay: float, with_min: bool
):
    K = 4
    min_losses = (
        torch.tensor([0.0, 0.05, 0.1, 0.0], dtype=F64) if with_min else torch.zeros(K, dtype=F64)
    )
    famo = FAMO(
        K, min_losses=min_losses if with_min else None, lr=lr, weight_decay=weight_decay
    ).double()
    assert isinstance(famo, Stateful)
    assert list(famo.parameters()) == []
    for _ in range(2):  # the second round runs after reset(): it must replay identically
        reference = _ReferenceFAMO(K, min_losses, lr, weight_decay)
        L = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=F64)
        generator = torch.Generator().manual_seed(0)
        for _step in range(6):
            values = L.clone().requires_grad_()
            (grad,) = torch.autograd.grad(famo(values), values)
            torch.testing.assert_close(grad, reference.gradient_weights(L))
            L = L * (0.5 + torch.rand(K, generator=generator, dtype=F64))
            famo.update(L)
            reference.update(L)
            torch.testing.assert_close(famo.logits, reference.xi.detach())
        famo.reset()
        assert torch.equal(famo.logits, torch.zeros(K, dtype=F64))


def test_value_and_weights():
    famo = FAMO((2, 2))
    L = torch.tensor([[1.0, 2.0], [4.0, 0.5]], dtype=F64)
    z = torch.full((2, 2), 0.25)
    torch.testing.assert_close(famo.weights(), z)
    expected = (z * (L + 1e-8).log()).sum() / (z / (L + 1e-8)).sum()
    torch.testing.assert_close(famo(L), expected)


def test_the_loss_that_decreases_least_gains_weight():
    famo = FAMO(3)
    famo(torch.tensor([1.0, 1.0, 1.0]))
    famo.update(torch.tensor([0.5, 0.9, 1.0]))
    z = famo.weights()
    assert z[0] < z[1]  # Adam's first step only sees the signs of δ
    assert z[0] < z[2]


def test_bad_inputs():
    with pytest.raises(RuntimeError, match=r"`update` needs the losses of the previous step"):
        FAMO(2).update(torch.ones(2))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the logits, \(3,\)"):
        FAMO(3)(torch.ones(2))
    famo = FAMO(3)
    famo(torch.ones(3))
    with pytest.raises(ValueError, match=r"`values` must have the shape of the logits, \(3,\)"):
        famo.update(torch.ones(4))
    with pytest.raises(ValueError, match=r"`min_losses` must have the shape \(3,\)"):
        FAMO(3, min_losses=torch.zeros(2))
    with pytest.raises(ValueError, match=r"`lr` must be positive. Found lr=0.0"):
        FAMO(3, lr=0.0)
    with pytest.raises(
        ValueError, match=r"`weight_decay` must be non-negative. Found weight_decay=-1"
    ):
        FAMO(3, weight_decay=-1)
    famo.reset()
    with pytest.raises(RuntimeError, match=r"`update` needs the losses"):
        famo.update(torch.ones(3))


def test_repr():
    assert repr(FAMO(2)) == "FAMO(shape=(2,), lr=0.025, weight_decay=0.001)"


def test_state_dict_restores_the_logits_and_adam_state():
    famo = FAMO(3)
    for L, L_next in [([1.0, 2.0, 3.0], [0.9, 1.0, 2.0]), ([0.9, 1.0, 2.0], [0.5, 0.9, 1.9])]:
        famo(torch.tensor(L))
        famo.update(torch.tensor(L_next))
    restored = FAMO(3)
    restored.load_state_dict(famo.state_dict())
    for scalarizer in [famo, restored]:
        scalarizer(torch.tensor([0.5, 0.9, 1.9]))
        scalarizer.update(torch.tensor([0.4, 0.8, 1.0]))
    assert torch.equal(restored.logits, famo.logits)
