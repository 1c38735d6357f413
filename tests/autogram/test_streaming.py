"""The rules that need only the recorded tensors run during the Gramian's backward pass, so that
the output gradients of a layer do not outlive the layer's turn in that pass."""

import weakref

import torch
from torch import Tensor, nn

from tests.autogram._helpers import assert_gramian_exact
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine, _streaming


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 1))


def test_upper_output_gradients_are_freed_before_the_lower_ones_are_computed():
    model = mlp()
    engine = Engine(model, batch_dim=0)
    # forward hooks registered after the engine's: their tensor hooks run after the engine's
    upper: list[weakref.ref] = []
    alive_at_lower: list[bool] = []

    def on_upper(module, inputs, out):
        out.register_hook(lambda g: upper.append(weakref.ref(g)))

    def on_lower(module, inputs, out):
        out.register_hook(lambda g: alive_at_lower.append(upper[0]() is not None))

    model[4].register_forward_hook(on_upper)
    model[0].register_forward_hook(on_lower)
    losses = model(torch.randn(5, 3)).squeeze(1)
    engine.compute_gramian(losses)
    assert alive_at_lower == [False]


def test_hooks_after_the_engines_see_the_real_gradients():
    model = mlp()
    engine = Engine(model, batch_dim=0)
    outputs: list[Tensor] = []
    seen: dict[int, Tensor] = {}

    def keep(module, inputs, out):
        k = len(outputs)
        outputs.append(out)
        out.register_hook(lambda g: seen.__setitem__(k, g.clone()))

    for layer in (model[0], model[2], model[4]):
        layer.register_forward_hook(keep)
    losses = model(torch.randn(5, 3)).squeeze(1)
    weights = torch.rand(5)
    expected = torch.autograd.grad(losses, outputs, weights, retain_graph=True)
    ones = torch.autograd.grad(losses, outputs, torch.ones(5), retain_graph=True)
    seen.clear()
    engine.compute_gramian(losses)  # the hooks get the gradients of the sum of the losses
    for k in range(3):
        torch.testing.assert_close(seen[k], ones[k])
    losses.backward(weights)  # the graph and the hooks' gradients are intact for the next pass
    for k in range(3):
        torch.testing.assert_close(seen[k], expected[k])


def test_streamed_gramian_is_exact_with_a_module_called_twice():
    # The rule of a module called twice runs once both calls' output gradients are known.
    torch.manual_seed(0)
    shared, other = nn.Linear(3, 3).double(), nn.Linear(3, 1).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    forward = lambda: other(shared(shared(x).tanh())).squeeze(1)  # noqa: E731
    assert_gramian_exact([shared, other], forward, 0)


def test_fused_step_with_streamed_rules_matches_the_two_pass_step():
    model = mlp()
    x = torch.randn(6, 3)
    grads = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with Engine(model, batch_dim=0) as engine:
            losses = model(x).squeeze(1)
            if fused:
                engine.backward(losses, UPGradWeighting())
            else:
                losses.backward(UPGradWeighting()(engine.compute_gramian(losses)))
        grads.append([p.grad.clone() for p in model.parameters()])
    for g, g_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g, g_ref)


def test_upper_attention_layer_streams_and_stays_exact(monkeypatch):
    # The upper layer's attention projections lie above the lower layer's: their gradients come
    # from pre-hooks of their nodes, and the upper attention block is done during the pass.
    torch.manual_seed(0)
    layers = [
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        for _ in range(2)
    ]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 8, 1)).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    streams: list[_streaming.GramianStream] = []
    init = _streaming.GramianStream.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        streams.append(self)

    monkeypatch.setattr(_streaming.GramianStream, "__init__", spy)
    assert_gramian_exact([model], lambda: model(x).squeeze(1), 0)
    assert layers[1].self_attn in streams[0].done
    assert layers[0].self_attn not in streams[0].done  # its input projection is the lowest
