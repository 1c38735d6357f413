"""One engine over many steps whose graphs differ: another branch taken, a module frozen or
unfrozen, a module called twice, a parameter also used outside its module, a user's forward
hook, a parameter replaced. Each step's Gramian is checked against brute force, and the fused
step's gradients against ``losses.backward(weights)``: nothing from an earlier step may leak
into a later one."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tests.autogram._helpers import trainable
from tests.reference.jacobians import brute_force_gramian
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 4)
        self.square = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.mode = "a"

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.b(x) if self.mode == "b" else self.a(x))
        if self.mode == "twice":
            h = self.square(torch.tanh(self.square(h)))
        elif self.mode != "skip":
            h = self.square(h)
        out = self.head(torch.tanh(h)).squeeze(1)
        if self.mode == "outside":  # the head's weight also used outside the head's call
            out = out + (x[:, :4] * self.head.weight).sum(dim=1)
        return out


def _freeze(net: Branches) -> None:
    net.a.weight.requires_grad_(False)


def _unfreeze(net: Branches) -> None:
    net.a.weight.requires_grad_(True)


def _freeze_module(net: Branches) -> None:
    net.square.requires_grad_(False)


def _unfreeze_module(net: Branches) -> None:
    net.square.requires_grad_(True)


def _replace_weight(net: Branches) -> None:
    net.a.weight = nn.Parameter(torch.randn(4, 5))


def _mode(mode: str) -> Callable[[Branches], None]:
    def change(net: Branches) -> None:
        net.mode = mode

    return change


SCHEDULE: list[Callable[[Branches], None]] = [
    _mode("a"),
    _mode("a"),
    _mode("b"),
    _mode("twice"),
    _mode("skip"),
    _mode("a"),
    _freeze,
    _unfreeze,
    _freeze_module,
    _mode("twice"),
    _unfreeze_module,
    _replace_weight,
    _mode("b"),
    _mode("a"),
]


def _gradients(net: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def _reference_gradients(net: Branches, x: Tensor, weights: Tensor) -> list[Tensor | None]:
    """The gradients of ``weights · losses`` by autograd, on a twin of ``net`` without engine."""
    twin = Branches()
    twin.load_state_dict(net.state_dict())
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        q.requires_grad_(p.requires_grad)
    twin.mode = net.mode
    twin(x).backward(weights)
    return _gradients(twin)


def _assert_same(got: list[Tensor | None], expected: list[Tensor | None]) -> None:
    for g, ref in zip(got, expected, strict=True):
        assert (g is None) == (ref is None)
        if g is not None:
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused_first", [False, True])
def test_graph_changes_between_steps(fused_first: bool) -> None:
    torch.manual_seed(0)
    net = Branches()
    x = torch.randn(6, 5)
    weighting = UPGradWeighting()
    with Engine(net, batch_dim=0) as engine:
        for change in SCHEDULE:
            change(net)
            for fused in (fused_first, not fused_first):
                net.zero_grad(set_to_none=True)
                losses = net(x)
                if fused:
                    weights = engine.backward(losses, weighting)
                    _assert_same(_gradients(net), _reference_gradients(net, x, weights))
                else:
                    G = engine.compute_gramian(losses)
                    expected = brute_force_gramian(losses, trainable(net))
                    torch.testing.assert_close(G, expected, rtol=1e-10, atol=1e-12)


def test_parameter_used_outside_its_module_then_not() -> None:
    """The fused step sends the head's weight through the second backward pass when it is
    used outside the head's call, and fuses it again once it is not."""
    torch.manual_seed(1)
    net = Branches()
    x = torch.randn(6, 5)
    weighting = UPGradWeighting()
    with Engine(net, batch_dim=0) as engine:
        for mode in ("a", "outside", "a", "outside"):
            net.mode = mode
            net.zero_grad(set_to_none=True)
            weights = engine.backward(net(x), weighting)
            _assert_same(_gradients(net), _reference_gradients(net, x, weights))


def test_user_forward_hook_added_between_steps() -> None:
    """A hook of the user that changes a module's output, added then removed between steps."""
    torch.manual_seed(2)
    net = Branches()
    x = torch.randn(6, 5)
    with Engine(net, batch_dim=0) as engine:
        for hooked in (False, True, False):
            handle = net.a.register_forward_hook(lambda m, a, out: 2.0 * out) if hooked else None
            losses = net(x)
            G = engine.compute_gramian(losses)
            torch.testing.assert_close(
                G, brute_force_gramian(losses, trainable(net)), rtol=1e-10, atol=1e-12
            )
            if handle is not None:
                handle.remove()


class DictOut(nn.Module):
    """Takes its input as a keyword, returns a dict: the recorded call's pytrees are not flat."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, *, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.linear(x) * self.scale, "aux": x.sum(dim=1)}


def test_keyword_inputs_dict_outputs_and_aliased_parameter() -> None:
    """A module called with keywords and returning a dict, and a Linear whose weight is also
    registered under a second name: the Gramian and the fused gradients stay exact."""
    torch.manual_seed(3)
    model = DictOut()
    model.linear.alias = model.linear.weight  # the same Parameter under two names
    x = torch.randn(6, 5)
    with Engine(model, batch_dim=0) as engine:
        for _ in range(2):
            losses = model(x=x)["out"].pow(2).sum(dim=1)
            G = engine.compute_gramian(losses)
            torch.testing.assert_close(
                G, brute_force_gramian(losses, trainable(model)), rtol=1e-10, atol=1e-12
            )
            model.zero_grad(set_to_none=True)
            weights = engine.backward(model(x=x)["out"].pow(2).sum(dim=1), UPGradWeighting())
            got = _gradients(model)
            model.zero_grad(set_to_none=True)
            reference = model(x=x)["out"].pow(2).sum(dim=1)
            engine.compute_gramian(reference)  # consumes the record; the graph is kept
            reference.backward(weights)
            _assert_same(got, _gradients(model))
