"""The fused step frees the graph as its single backward pass runs, when no second pass follows."""

import weakref

import pytest
import torch
from torch import Tensor, nn

from tests.autogram.test_fused import assert_fused_exact, leaves_of
from torchjd.aggregation import MeanWeighting, UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autogram._rules import _linear


class SinBetween(nn.Module):
    """Linear, sin, LayerNorm, Linear: the first Linear's output is held by the sine's backward
    node alone (the engine keeps a call's inputs, not its outputs), so it lives exactly as long as
    the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.norm, self.last = nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 1)
        self.saved: list[weakref.ref] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x)
        self.saved.append(weakref.ref(h))
        return self.last(self.norm(h.sin())).squeeze(1)


def test_fused_step_frees_the_saved_tensors():
    torch.manual_seed(0)
    model, x = SinBetween(), torch.randn(6, 5)
    with Engine(model, batch_dim=0) as engine:
        losses = model(x).pow(2)
        assert model.saved[-1]() is not None  # the graph holds it
        engine.backward(losses, UPGradWeighting())
        assert model.saved[-1]() is None  # freed by the backward pass, `losses` still alive
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            losses.backward(torch.ones_like(losses))


def test_two_pass_step_keeps_the_graph_for_the_weighted_backward():
    torch.manual_seed(0)
    model, x = SinBetween(), torch.randn(6, 5)
    with Engine(model, batch_dim=0) as engine:
        losses = model(x).pow(2)
        weights = UPGradWeighting()(engine.compute_gramian(losses))
        assert model.saved[-1]() is not None
        losses.backward(weights)


def test_transformer_fused_step_frees_the_graph():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 8, 1))
    x = torch.randn(3, 4, 8)
    with Engine(model, batch_dim=0) as engine:
        losses = model(x).squeeze(1)
        engine.backward(losses, MeanWeighting())
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            losses.backward(torch.ones_like(losses))
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("case", ["input requires grad", "max_kept_bytes", "outside module"])
def test_steps_with_a_second_pass_stay_exact(case):
    # The second backward pass needs the graph: it must not be freed by the first one.
    torch.manual_seed(0)
    model, x = SinBetween(), torch.randn(6, 5, requires_grad=case == "input requires grad")
    modules = [model.first, model.norm] if case == "outside module" else [model]
    kwargs = {"max_kept_bytes": 0} if case == "max_kept_bytes" else {}
    forward = lambda: model(x).pow(2)  # noqa: E731
    assert_fused_exact(modules, forward, 0, leaves_of([model], [x]), **kwargs)


def test_a_rule_that_gives_less_than_it_promised_is_caught(monkeypatch):
    # A built-in rule's `fuses` promises every parameter; if its weighted gradients left one out
    # after the graph was freed, the missing gradient could not be computed any more.
    def without_bias(module, calls, W):
        return [
            (p, g) for p, g in linear_weighted_gradients(module, calls, W) if p is module.weight
        ]

    linear_weighted_gradients = _linear.linear_rule.weighted_gradients
    monkeypatch.setattr(_linear.linear_rule, "weighted_gradients", without_bias)
    model = nn.Linear(3, 1)
    engine = Engine(model, batch_dim=0)
    with pytest.raises(RuntimeError, match=r"graph of `losses` was freed.*report"):
        engine.backward(model(torch.randn(4, 3)).squeeze(1), MeanWeighting())
