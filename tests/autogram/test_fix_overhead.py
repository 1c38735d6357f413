"""The engine's cheaper per-step bookkeeping gives what the full one gives: the uses of the
parameters inside the calls when inputs come by keyword or are parameters, the trainable modules
read afresh at every step (parameters frozen, unfrozen or registered under two names between
steps), and the Gramian's backward pass through ``torch.autograd.grad`` under an active
``__torch_function__`` mode."""

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from tests.reference.jacobians import brute_force_gramian
from torchjd.aggregation import MeanWeighting
from torchjd.autogram import Engine
from torchjd.autogram._fused import calls_uses

ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def reachable(roots: list) -> set:
    seen: set = set()
    stack = [node for node in roots if node is not None]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(child for child, _ in node.next_functions if child is not None)
    return seen


def reference_uses(call) -> dict[int, int]:
    """Edges into each leaf's node from the call's nodes: reachable from its outputs, not from
    any of its tensor inputs, positional or keyword."""
    inputs = [*call.args, *call.kwargs.values()]
    stops = [t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None]
    uses: dict[int, int] = {}
    for node in reachable([edge.node for edge in call.edges]) - reachable(stops):
        for child, _ in node.next_functions:
            if type(child) is ACCUMULATE_GRAD:
                uses[id(child.variable)] = uses.get(id(child.variable), 0) + 1
    return uses


class Mixer(nn.Module):
    """Takes its second input by keyword (and a flag), and uses its weight twice."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: Tensor, *, y: Tensor, twice: bool = True) -> Tensor:
        out = x @ self.weight + y
        return out @ self.weight if twice else out


def test_uses_inside_a_call_stop_at_keyword_and_parameter_inputs():
    torch.manual_seed(0)
    upstream, mixer = nn.Linear(3, 3), Mixer()
    extra = nn.Parameter(torch.randn(4, 3))
    with Engine(upstream, mixer, batch_dim=0) as engine:
        x = torch.randn(4, 3)
        h = upstream(x)
        out = mixer(h, y=torch.tanh(upstream(x)))  # a keyword input computed from parameters
        out = out + mixer(extra, y=h, twice=False)  # a parameter as positional input
        out.sum(dim=1)
        calls = engine._calls[mixer]
        for call in calls:
            assert calls_uses([call]) == reference_uses(call)
        # what lies below the inputs (upstream's parameters) is not the call's; a leaf input's
        # node is reached from the call's nodes: an edge of the call
        assert calls_uses(calls) == {id(mixer.weight): 3, id(extra): 1}


def test_trainable_modules_follow_the_flags_from_step_to_step():
    torch.manual_seed(0)
    first, second = nn.Linear(3, 4, dtype=torch.float64), nn.Linear(4, 2, dtype=torch.float64)
    model = nn.Sequential(first, nn.Tanh(), second)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)  # a frozen layer is recorded
    with Engine(model, batch_dim=0) as engine:
        for frozen in ([first.weight, first.bias], [], [first.bias], [first.weight, first.bias]):
            for param in model.parameters():
                param.requires_grad_(all(param is not p for p in frozen))
            losses = model(x).pow(2).sum(dim=1)
            params = [p for p in model.parameters() if p.requires_grad]
            G = engine.compute_gramian(losses)
            assert torch.allclose(G, brute_force_gramian(losses, params), rtol=1e-10, atol=0)
        for param in model.parameters():
            param.requires_grad_(True)
        second.requires_grad_(False)
        second.weight.requires_grad_(True)  # the fused step too, one parameter of the layer
        model.zero_grad()
        losses = model(x).pow(2).sum(dim=1)
        expected = brute_force_gramian(losses, [first.weight, first.bias, second.weight])
        gramians: list[Tensor] = []

        def weighting(gramian: Tensor) -> Tensor:
            gramians.append(gramian)
            return MeanWeighting()(gramian)

        weights = engine.backward(losses, weighting)
        assert torch.allclose(gramians[0], expected, rtol=1e-10, atol=0)
        assert second.bias.grad is None
        reference = torch.autograd.grad(
            model(x).pow(2).sum(dim=1), [first.weight, second.weight], weights
        )
        assert torch.allclose(first.weight.grad, reference[0], rtol=1e-10, atol=0)
        assert torch.allclose(second.weight.grad, reference[1], rtol=1e-10, atol=0)


class TwoNames(nn.Module):
    """One parameter registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.b = self.a

    def forward(self, x: Tensor) -> Tensor:
        return x * self.a


def test_a_parameter_under_two_names_frozen_then_unfrozen():
    torch.manual_seed(0)
    linear, module = nn.Linear(3, 3, dtype=torch.float64), TwoNames()
    x = torch.randn(4, 3, dtype=torch.float64)
    with Engine(linear, module, batch_dim=0) as engine:
        for trainable in (False, True, False):
            module.b.requires_grad_(trainable)  # the same tensor as module.a
            losses = module(linear(x)).sum(dim=1)
            params = [*linear.parameters(), *([module.a] if trainable else [])]
            G = engine.compute_gramian(losses)
            assert torch.allclose(G, brute_force_gramian(losses, params), rtol=1e-10, atol=0)


class Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_the_backward_pass_defers_to_an_active_torch_function_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with Engine(model, batch_dim=0) as engine:
        expected = engine.compute_gramian(model(x).sum(dim=1))
        recorder = Recorder()
        losses = model(x).sum(dim=1)
        with recorder:
            G = engine.compute_gramian(losses)
    assert torch.autograd.grad in recorder.seen  # not bypassed
    assert torch.equal(G, expected)
