"""The engine under automatic mixed precision: ``torch.autocast`` (bfloat16 on CPU) and a
``GradScaler``."""

import torch
from torch import nn

from tests.reference.jacobians import brute_force_gramian
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4 * 6 * 6)
        self.head = nn.Sequential(nn.Linear(4 * 6 * 6, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x).relu().flatten(1)))


def _losses(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(x)
    assert output.dtype == torch.bfloat16  # autocast is on
    return output.float().pow(2).sum(dim=1)


def test_gramian_under_autocast_is_that_of_the_bfloat16_graph():
    torch.manual_seed(0)
    model = _Model().float()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float32)
    engine = Engine(model, batch_dim=0)
    losses = _losses(model, x)
    G = engine.compute_gramian(losses)
    expected = brute_force_gramian(losses, list(model.parameters()))
    assert G.dtype == torch.float32
    # bfloat16 has 8 bits of mantissa: the two computations round differently
    assert (G - expected).abs().max() <= 3e-2 * expected.abs().max()
    assert (G - G.T).abs().max() == 0


def test_fused_step_with_a_grad_scaler_is_the_scaled_step():
    # UPGrad's weights are invariant to the scale of the losses, so the scaled fused step leaves
    # s times the unscaled gradients, which the scaler's step unscales.
    torch.manual_seed(0)
    model = _Model().float()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float32)
    engine = Engine(model, batch_dim=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    weights = engine.backward(_losses(model, x), UPGradWeighting())
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scaled_weights = engine.backward(scaler.scale(_losses(model, x)), UPGradWeighting())
    torch.testing.assert_close(scaled_weights, weights, rtol=1e-4, atol=1e-6)
    for p, grad in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, 2.0**10 * grad, rtol=1e-4, atol=1e-3)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(optimizer)  # unscales, then steps as with the unscaled gradients
    for p, start, grad in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), start - 0.1 * grad, rtol=1e-4, atol=1e-6)
