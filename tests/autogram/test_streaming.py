"""The rules that need only the recorded tensors run during the Gramian's backward pass, so that
the output gradients of a layer do not outlive the layer's turn in that pass."""

import weakref

import torch
from torch import Tensor, nn

from tests.autogram._helpers import assert_gramian_exact
from tests.autogram.test_fused import assert_fused_exact, leaves_of
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine, _streaming


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 1))


def test_upper_output_gradients_are_freed_before_the_lower_ones_are_computed():
    model = mlp()
    engine = Engine(model, batch_dim=0)
    x = torch.randn(5, 3)
    assert _upper_alive_at_lower(model, lambda: engine.compute_gramian(model(x).squeeze(1))) == [
        False
    ]


def _upper_alive_at_lower(model: nn.Sequential, step) -> list[bool]:
    """Whether the gradient w.r.t. the output of ``model[4]`` (the upper layer) is still alive when
    each gradient w.r.t. the output of ``model[0]`` is computed, during ``step()``."""
    # forward hooks registered after the engine's: their tensor hooks run after the engine's
    upper: list[weakref.ref] = []
    alive_at_lower: list[bool] = []

    def on_upper(module, inputs, out):
        out.register_hook(lambda g: upper.append(weakref.ref(g)))

    def on_lower(module, inputs, out):
        out.register_hook(lambda g: alive_at_lower.append(upper[0]() is not None))

    handles = [model[4].register_forward_hook(on_upper), model[0].register_forward_hook(on_lower)]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return alive_at_lower


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
    streams = _spy_streams(monkeypatch)
    assert_gramian_exact([model], lambda: model(x).squeeze(1), 0)
    assert layers[1].self_attn in streams[0].done
    assert layers[0].self_attn not in streams[0].done  # its input projection is the lowest


def test_rules_stream_under_a_budget_and_the_budget_goes_to_the_upper_layers():
    # With max_kept_bytes > 0, the rules still run during the Gramian's backward pass: the upper
    # layer's output gradients (not kept) are freed before the lower layer's are computed; the
    # budget goes to the layers as the pass reaches them.
    model = mlp().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    # model[4] keeps its per-sample gradients [5, 2] and output sums [5, 1] (120 bytes), model[2]
    # its output gradients [1, 5, 2] (80 bytes): in the order of the calls, a budget of 120 would
    # go to model[2]
    for budget, kept_top in [(1, False), (120, True)]:
        reached: set[int] = set()
        handles = [p.register_hook(_marker(reached, p)) for p in model.parameters()]
        with Engine(model, batch_dim=0) as engine:
            losses = lambda: model(x).squeeze(1)  # noqa: E731
            step = lambda: engine.backward(losses(), UPGradWeighting(), max_kept_bytes=budget)  # noqa: B023, E731
            alive_at_lower = _upper_alive_at_lower(model, step)
        for handle in handles:
            handle.remove()
        if not kept_top:  # (model[0]'s hook runs again in the second backward pass)
            assert not alive_at_lower[0]
        # the parameters of the layers not kept get their gradients from the second backward
        second_pass = model[:3].parameters() if kept_top else model.parameters()
        assert reached == {id(p) for p in second_pass}
        model.zero_grad(set_to_none=True)


def _marker(reached: set[int], param: Tensor):
    return lambda grad: reached.add(id(param))


def _two_objectives(model: nn.Sequential, x: Tensor) -> Tensor:
    """``[B, 2]``: two objectives per sample."""
    y = model(x)
    return torch.cat([y, y.pow(2)], dim=1)


def test_several_objectives_per_sample_stream_too():
    # The backward pass is vectorised over the objectives; the hooks take every objective's
    # gradients at once, and the upper layer's are freed before the lower layer's are computed.
    model = mlp()
    engine = Engine(model, batch_dim=0)
    x = torch.randn(5, 3)
    step = lambda: engine.compute_gramian(_two_objectives(model, x))  # noqa: E731
    assert _upper_alive_at_lower(model, step) == [False]


def test_several_objectives_per_sample_stream_exactly(monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 8, 3)).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    streams = _spy_streams(monkeypatch)
    assert_gramian_exact([model], lambda: model(x).pow(2), 0)
    assert {layer.linear1, layer.linear2, layer.norm1, layer.norm2} <= streams[0].done


class _Unbatchable(torch.autograd.Function):
    """The identity, whose backward pass refuses to be vectorised (as an operation without a
    batching rule does)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if torch._C._functorch.is_legacy_batchedtensor(grad):
            raise RuntimeError("no batching rule")
        return grad


def test_several_objectives_when_the_vectorised_pass_fails(monkeypatch):
    # The rules of the upper layers ran before the pass failed: their work is undone, and the
    # pass runs again, one objective at a time, without the stream.
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)
    ).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    streams = _spy_streams(monkeypatch)

    def forward() -> Tensor:
        h = _Unbatchable.apply(model[:2](x))
        return _two_objectives(model[2:], h)

    assert_gramian_exact([model], forward, 0)
    assert streams[0].done >= {model[4], model[3]}  # they had run: undone
    assert_fused_exact([model], forward, 0, leaves_of([model]), max_kept_bytes=200)


def _spy_streams(monkeypatch) -> list[_streaming.GramianStream]:
    streams: list[_streaming.GramianStream] = []
    init = _streaming.GramianStream.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        streams.append(self)

    monkeypatch.setattr(_streaming.GramianStream, "__init__", spy)
    return streams
