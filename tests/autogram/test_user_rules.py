"""A user's rule with ``weighted_gradients``: the fused step uses it instead of a second backward
pass, gives the two-pass step's gradients, and refuses malformed answers."""

import pytest
import torch
from torch import Tensor, nn

from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine, register_rule


class Scale(nn.Module):
    """``y = s ⊙ x`` over the last dimension of inputs ``[B, T, d]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(dim, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.s * x


def scale_rule(module: nn.Module, calls) -> Tensor:
    J = sum(
        (call.grad_output(0) * call.args[0]).sum(dim=2).movedim(1, 0) for call in calls
    )  # [B, R, d]: batch_dim=0
    J = J.flatten(end_dim=1)
    return J @ J.T


def scale_gradients(module: nn.Module, calls, W: Tensor):
    return [(module.s, sum((c.weighted_grad_output(W) * c.args[0]).sum(dim=(0, 1)) for c in calls))]


def make_model(scale_type: type[Scale]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4).double(), scale_type(4), nn.Tanh(), nn.Linear(4, 2).double()
    )


def forward(model: nn.Module) -> Tensor:
    torch.manual_seed(1)
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    scale = model[1]
    return model(x).sum(dim=1) + scale(model[0](x)).square().mean(dim=(1, 2)).unsqueeze(1)


def grads_of(model: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def two_pass_grads(scale_type: type[Scale]) -> list[Tensor]:
    model = make_model(scale_type)
    with Engine(model, batch_dim=0) as engine:
        losses = forward(model)
        losses.backward(UPGradWeighting()(engine.compute_gramian(losses)).reshape(losses.shape))
    return grads_of(model)


def test_fused_step_uses_weighted_gradients_and_matches_two_pass():
    class FusedScale(Scale):
        pass

    calls = []

    def counted(module, module_calls, W):
        calls.append(len(module_calls))
        return scale_gradients(module, module_calls, W)

    register_rule(FusedScale, scale_rule, weighted_gradients=counted)
    expected = two_pass_grads(FusedScale)
    calls.clear()
    model = make_model(FusedScale)
    backward_reached_s = []
    model[1].s.register_hook(lambda g: backward_reached_s.append(True))
    with Engine(model, batch_dim=0) as engine:
        engine.backward(forward(model), UPGradWeighting())
    assert calls == [2]  # one call of weighted_gradients for the module's two calls
    assert not backward_reached_s  # no backward pass computed the gradient of s
    for got, want in zip(grads_of(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_weighted_gradients_returning_none_falls_back_to_backward():
    class LazyScale(Scale):
        pass

    register_rule(LazyScale, scale_rule, weighted_gradients=lambda module, calls, W: None)
    expected = two_pass_grads(LazyScale)
    model = make_model(LazyScale)
    backward_reached_s = []
    model[1].s.register_hook(lambda g: backward_reached_s.append(True))
    with Engine(model, batch_dim=0) as engine:
        engine.backward(forward(model), UPGradWeighting())
    assert backward_reached_s
    for got, want in zip(grads_of(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (lambda m, W: [(m.s, torch.zeros(3, dtype=torch.float64))], ValueError, r"shape \(3,\)"),
        (
            lambda m, W: [(nn.Parameter(torch.zeros(4)), torch.zeros(4))],
            ValueError,
            "not a trainable",
        ),
        (lambda m, W: [m.s], TypeError, r"\(parameter, gradient\) pairs"),
    ],
)
def test_malformed_weighted_gradients_are_refused_and_nothing_is_filled(answer, error, match):
    class BadScale(Scale):
        pass

    def bad_gradients(module, calls, W):
        return answer(module, W)

    register_rule(BadScale, scale_rule, weighted_gradients=bad_gradients)
    model = make_model(BadScale)
    engine = Engine(model, batch_dim=0)
    with pytest.raises(error, match=match):
        engine.backward(forward(model), UPGradWeighting())
    assert all(p.grad is None for p in model.parameters())
    assert not engine._calls  # the engine is ready for the next step
    assert engine._recording
    engine.close()


def test_weighted_gradients_must_be_callable():
    with pytest.raises(TypeError, match="`weighted_gradients` to be callable or None"):
        register_rule(Scale, scale_rule, weighted_gradients=3)  # type: ignore[arg-type]
