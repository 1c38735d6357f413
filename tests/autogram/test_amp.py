"""The engine under automatic mixed precision: ``torch.autocast`` (bfloat16 on CPU) and a
``GradScaler``."""

import pytest
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
    assert (G - G.T).abs().max() <= 1e-6 * G.abs().max()  # (float32 rounding, as without autocast)


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


def _float16_losses(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.float16):
        output = model(x)
    assert output.dtype == torch.float16
    return output.float().pow(2).sum(dim=1)


def test_float16_gramian_beyond_its_range_is_finite_and_exact():
    """Under float16 autocast the layers' gradients are float16, but the Gramian's entries (sums
    of products of them) exceed float16's 65504 here: the rules compute in float32, so the Gramian
    is that of the float16 graph (it was inf)."""
    torch.manual_seed(0)
    model = _Model().float()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float32)
    engine = Engine(model, batch_dim=0)
    losses = 300.0 * _float16_losses(model, x)  # (as a gradient scaler would)
    G = engine.compute_gramian(losses)
    expected = brute_force_gramian(losses, list(model.parameters()))
    assert expected.abs().max() > 1e6
    assert G.dtype == torch.float32
    assert (G - expected).abs().max() <= 1e-3 * expected.abs().max()


def test_engine_called_inside_autocast_computes_as_outside():
    """A training step that calls the engine inside ``torch.autocast`` (Lightning's mixed precision
    does): the Gramian and the fused step's gradients are those computed outside it."""
    torch.manual_seed(0)
    model = _Model().float()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float32)
    engine = Engine(model, batch_dim=0)
    G_out = engine.compute_gramian(_float16_losses(model, x))
    with torch.autocast("cpu", dtype=torch.float16):
        G_in = engine.compute_gramian(_float16_losses(model, x))
    torch.testing.assert_close(G_in, G_out, rtol=0, atol=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    grads = []
    for inside in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=inside):
            engine.backward(scaler.scale(_float16_losses(model, x)), UPGradWeighting())
        grads.append([p.grad.clone() for p in model.parameters()])
        assert all(g.isfinite().all() for g in grads[-1])
    for inside, outside in zip(*grads, strict=True):
        torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    # and the scaled fused step is the scaled two-pass step (float16 rounding apart)
    model.zero_grad()
    losses = _float16_losses(model, x)
    weights = UPGradWeighting()(engine.compute_gramian(losses))
    scaler.scale(losses).backward(weights)
    for fused, two_pass in zip(grads[0], [p.grad for p in model.parameters()], strict=True):
        assert (fused - two_pass).abs().max() <= 1e-2 * two_pass.abs().max()


class _Scaled(nn.Module):
    """A module without a built-in rule (the generic rule re-runs it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("make", [_Scaled, _Recurrent, _Attention])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_in_half_precision(make, dtype: torch.dtype):
    """A model held in half precision (``model.half()``, no autocast) computes its rules in it
    (rules that re-run it need its arguments in its parameters' dtype), and the fused step's
    gradients are the two-pass step's (no gradient counted twice)."""
    torch.manual_seed(0)
    model = make().to(dtype)
    x = torch.randn(5, 3, 4).to(dtype)
    engine = Engine(model, batch_dim=0)
    losses = model(x).float().pow(2).flatten(1).sum(dim=1)
    G = engine.compute_gramian(losses)
    expected = brute_force_gramian(losses, list(model.parameters()))
    tolerance = 1e-2 if dtype == torch.float16 else 5e-2
    assert (G - expected).abs().max() <= tolerance * expected.abs().max()
    weights = UPGradWeighting()(G)
    losses.backward(weights)
    two_pass = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    engine.backward(model(x).float().pow(2).flatten(1).sum(dim=1), UPGradWeighting())
    for p, g in zip(model.parameters(), two_pass, strict=True):
        assert p.grad.dtype == dtype
        assert (p.grad - g).abs().max() <= tolerance * g.abs().max()


@pytest.mark.parametrize("make", [_Attention, _Recurrent])
def test_fused_step_under_autocast_counts_each_gradient_once(make):
    """Under float16 autocast the rules see float32 copies of the calls; what a rule releases in
    the copies (output gradients, or the inner gradients of the attention's projections, kept as
    per-sample gradients instead) is released in the calls, so the fused step does not add both."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(5, 3, 4)
    engine = Engine(model, batch_dim=0)

    def losses() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            output = model(x)
        return output.float().pow(2).flatten(1).sum(dim=1)

    values = losses()
    values.backward(UPGradWeighting()(engine.compute_gramian(values)))
    two_pass = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    engine.backward(losses(), UPGradWeighting())
    for p, g in zip(model.parameters(), two_pass, strict=True):
        assert (p.grad - g).abs().max() <= 1e-2 * g.abs().max()
