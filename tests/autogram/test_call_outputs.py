"""A module's call whose outputs are not independent tensors: the same tensor returned twice, an
output computed from another (a slice, the softmax of logits, a chain of three), or an input
returned as it is by a module with parameters (a skipped block). The engine's Gramian and fused
step against brute force (each was wrong or raised before)."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.autogram._helpers import assert_gramian_exact
from tests.reference.jacobians import brute_force_gramian
from torchjd.aggregation import Weighting
from torchjd.autogram import Engine


class Outputs(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.W = nn.Parameter(torch.randn(5, 5, dtype=torch.float64) / 2)
        self.child = nn.Linear(5, 5, dtype=torch.float64)

    def forward(self, h: Tensor) -> tuple[Tensor, ...]:
        o = F.linear(h, self.W)
        if self.mode == "same_twice":
            return o, o
        if self.mode == "child_twice":
            c = self.child(o)
            return c, c
        if self.mode == "slice":
            return o, o[:, :2]
        if self.mode == "softmax":
            return o, o.softmax(dim=-1)
        a = self.child(o)  # "chain": b from a, c from both, each also used outside
        b = torch.tanh(a) * self.W.diagonal()
        return a, b, b * a


def _losses(outputs: tuple[Tensor, ...]) -> Tensor:
    return sum((k + 1) * out.pow(2).sum(dim=1) for k, out in enumerate(outputs))  # type: ignore[return-value]


MODES = ["same_twice", "child_twice", "slice", "softmax", "chain"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_dim", [0, None])
def test_gramian_of_outputs_that_depend_on_each_other(mode: str, batch_dim: int | None):
    torch.manual_seed(0)
    module = Outputs(mode)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert_gramian_exact([module], lambda: _losses(module(x)), batch_dim=batch_dim)


class _Squares(Weighting[Tensor]):
    """Weights that depend on every entry of the Gramian (a wrong Gramian shows in them)."""

    def forward(self, gramian: Tensor, /) -> Tensor:
        return gramian.pow(2).sum(dim=1)


@pytest.mark.parametrize("mode", MODES)
def test_fused_step_of_outputs_that_depend_on_each_other(mode: str):
    torch.manual_seed(0)
    module = Outputs(mode)
    x = torch.randn(4, 5, dtype=torch.float64)
    with Engine(module, batch_dim=0) as engine:
        weights = engine.backward(_losses(module(x)), _Squares())
    fused = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    losses = _losses(module(x))
    expected = _Squares()(brute_force_gramian(losses, list(module.parameters())))
    torch.testing.assert_close(weights, expected, rtol=1e-10, atol=0)
    module.zero_grad()
    losses.backward(expected)
    for grad, p in zip(fused, module.parameters(), strict=True):  # the child unused in some modes
        if grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=1e-12)


class Skippable(nn.Module):
    """A residual block with a layer-scale parameter, skipped at random in training (LayerDrop):
    a skipped call returns its input as it is."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.gamma = nn.Parameter(torch.full((5,), 0.5, dtype=torch.float64))
        self.linear = nn.Linear(5, 5, dtype=torch.float64)

    def forward(self, h: Tensor) -> Tensor:
        return h if self.skip else h + self.gamma * torch.tanh(self.linear(h))


def test_a_module_with_parameters_that_returns_its_input():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 5, dtype=torch.float64),
        Skippable(skip=True),
        Skippable(skip=False),
        nn.Linear(5, 1, dtype=torch.float64),
    )
    x = torch.randn(4, 5, dtype=torch.float64)
    used = [p for name, p in model.named_parameters() if not name.startswith("1.")]
    G = assert_gramian_exact([model], lambda: model(x).squeeze(1), batch_dim=0, params=used)
    assert G.shape == (4, 4)


class TwoHeads(nn.Module):
    """Two outputs computed from the input, neither from the other."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(5, 5, dtype=torch.float64))
        self.B = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return F.linear(h, self.A), torch.tanh(h @ self.B)


@pytest.mark.parametrize(("mode", "passes"), [("two_heads", 1), ("slice", 2), ("chain", 3)])
def test_backward_passes_of_the_generic_rule(monkeypatch, mode: str, passes: int):
    """One pass for the parameters, plus one per link of the longest chain of outputs computed
    from one another (found in the graph: no value read on the host)."""
    import torchjd.autogram._rules._generic as generic

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return batched_grad(*args, **kwargs)

    batched_grad = generic.batched_grad
    monkeypatch.setattr(generic, "batched_grad", counted)
    torch.manual_seed(0)
    module = TwoHeads() if mode == "two_heads" else Outputs(mode)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert_gramian_exact([module], lambda: _losses(module(x)), batch_dim=0)
    assert len(calls) == passes
