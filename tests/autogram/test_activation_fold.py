"""A lowest output followed by an elementwise activation alone: the Gramian's pass stops above
the activation, and the rule gets the gradient below it by the activation's backward formula
applied in place (see ``Engine._gramian_pass``)."""

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch._C._profiler import _EventType
from torch.profiler import profile

import torchjd.autogram._rules._conv as conv_module
from tests.autogram._helpers import assert_gramian_exact
from tests.reference.jacobians import brute_force_gramian
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine, _engine, _streaming


@pytest.fixture
def folds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Folds the activations above lowest outputs of any size; lists the types of the folded
    nodes, then those whose formula was applied in place, prefixed "in place" (a spy on
    ``fold_activation`` would hold the gradient, which would then not be overwritten)."""
    monkeypatch.setattr(_streaming, "FOLD_MIN_BYTES", 0)
    counted: list[str] = []

    def activation_folds(*args):
        found = _streaming.activation_folds(*args)
        counted.extend(type(node).__name__ for node in found.values())
        return found

    monkeypatch.setattr(_engine, "activation_folds", activation_folds)
    formulas = dict(_streaming.IN_PLACE_BACKWARDS)
    for name, formula in formulas.items():

        def counting(node, grad: Tensor, name: str = name, formula=formula) -> Tensor:
            counted.append(f"in place {name}")
            return formula(node, grad)

        formulas[name] = counting
    monkeypatch.setattr(_streaming, "IN_PLACE_BACKWARDS", formulas)
    return counted


ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu_inplace": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def _cnn(activation: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), activation, nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    )  # fmt: skip


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _seq() -> nn.Sequential:  # several positions per sample: the lowest Linear's Γ is [B, T, d]
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2), nn.Flatten())


CASES = {
    **{
        f"cnn_{name}": (lambda make=make: _cnn(make()), (4, 3, 8, 8))
        for name, make in ACTIVATIONS.items()
    },
    "cnn_channels_last": (
        lambda: _cnn(nn.ReLU()).to(memory_format=torch.channels_last),
        (4, 3, 8, 8),
    ),
    "mlp": (_mlp, (6, 5)),
    "sequence": (_seq, (3, 4, 5)),
    "relu_last": (lambda: nn.Sequential(nn.Linear(5, 3), nn.ReLU()), (6, 5)),
}


def _input(name: str, shape: tuple[int, ...]) -> Tensor:
    x = torch.randn(shape, dtype=torch.float64)
    return x.to(memory_format=torch.channels_last) if "channels_last" in name else x


def _losses(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return (out * torch.linspace(-1.0, 1.0, out.shape[-1], dtype=out.dtype)).sum(dim=-1)


@pytest.mark.parametrize("name", list(CASES))
def test_gramian_is_exact(name: str, folds: list[str]) -> None:
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = build().double()
    x = _input(name, shape)
    assert_gramian_exact([model], lambda: _losses(model, x).reshape(shape[0], -1), 0)
    assert len(folds) == 2
    assert folds[1] == f"in place {folds[0]}"


@pytest.mark.parametrize("max_kept_bytes", [None, 0])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_step_matches_the_two_passes(
    name: str, max_kept_bytes: int | None, folds: list[str]
) -> None:
    build, shape = CASES[name]
    torch.manual_seed(1)
    model = build().double()
    other = copy.deepcopy(model)
    x = _input(name, shape)
    weighting = UPGradWeighting()
    engine = Engine(model, batch_dim=0)
    for _ in range(2):  # the second step with the engine's buffers kept from the first
        losses = _losses(model, x).reshape(shape[0], -1).sum(dim=1)
        engine.backward(losses, weighting, max_kept_bytes=max_kept_bytes)
        with Engine(other, batch_dim=0) as reference:
            other_losses = _losses(other, x).reshape(shape[0], -1).sum(dim=1)
            weights = weighting(reference.compute_gramian(other_losses))
            other_losses.backward(weights)
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
            p.grad = q.grad = None
    # both steps of the reference; of the fused step when it keeps the graph (a budget), as
    # a pass that frees the graph folds nothing
    steps = 2 if max_kept_bytes is None else 4
    assert folds == [folds[0], f"in place {folds[0]}"] * steps


def test_several_objectives_per_sample_are_exact_without_the_fold(folds: list[str]) -> None:
    torch.manual_seed(5)
    model = _cnn(nn.ReLU()).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert_gramian_exact([model], lambda: model(x), 0)  # [4, 3]: three objectives per sample
    assert not folds  # the vectorised pass returns batched gradients: not folded


def test_an_output_also_used_elsewhere_is_not_folded(folds: list[str]) -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return self.head((torch.relu(y) + y).flatten(1))

    torch.manual_seed(6)
    model = Residual().double()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    assert_gramian_exact([model], lambda: model(x).sum(dim=1), 0)
    assert not folds


def test_a_gradient_kept_by_a_hook_above_the_activation_is_not_overwritten(
    folds: list[str],
) -> None:
    torch.manual_seed(2)
    model = _cnn(nn.ReLU()).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    engine = Engine(model, batch_dim=0)
    kept: list[Tensor] = []
    relu_outputs: list[Tensor] = []

    def keep(module: nn.Module, args: tuple, output: Tensor) -> None:
        relu_outputs.append(output)
        output.register_hook(lambda grad: kept.append(grad))

    model[1].register_forward_hook(keep)
    losses = _losses(model, x)
    expected = torch.autograd.grad(losses.sum(), relu_outputs[0], retain_graph=True)[0].clone()
    kept.clear()
    G = engine.compute_gramian(losses)
    assert folds == ["ReluBackward0"]  # folded, not in place: the hook holds the gradient
    assert len(kept) == 1
    torch.testing.assert_close(kept[0], expected, rtol=0, atol=0)
    assert (expected[relu_outputs[0] == 0] != 0).any()  # the ReLU's mask would change it
    reference = brute_force_gramian(losses, list(model.parameters()))
    torch.testing.assert_close(G, reference, rtol=1e-10, atol=1e-12)


def test_a_retained_gradient_above_the_activation_is_not_overwritten(folds: list[str]) -> None:
    torch.manual_seed(7)
    model = _cnn(nn.ReLU()).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    engine = Engine(model, batch_dim=0)
    relu_outputs: list[Tensor] = []

    def retain(module: nn.Module, args: tuple, output: Tensor) -> None:
        output.retain_grad()
        relu_outputs.append(output)

    model[1].register_forward_hook(retain)
    losses = _losses(model, x)
    expected = torch.autograd.grad(losses.sum(), relu_outputs[0], retain_graph=True)[0].clone()
    relu_outputs[0].grad = None
    engine.compute_gramian(losses)
    assert folds[0] == "ReluBackward0"
    torch.testing.assert_close(relu_outputs[0].grad, expected, rtol=0, atol=0)


def test_a_hook_of_the_lowest_output_still_runs(folds: list[str]) -> None:
    torch.manual_seed(3)
    model = _cnn(nn.ReLU())
    engine = Engine(model, batch_dim=0)
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        output.register_hook(lambda grad: seen.append(grad))

    model[0].register_forward_hook(hook)
    losses = _losses(model, torch.randn(4, 3, 8, 8))
    engine.compute_gramian(losses)
    assert len(seen) == 1
    assert seen[0].shape == (4, 6, 8, 8)
    assert not folds  # not folded: the hook would not run


def _peak_allocated(run: Callable[[], object]) -> int:
    """The peak of the CPU allocator's bytes during ``run()``, above the level at its start (from
    the profiler's allocation events, which, unlike a dispatch mode, leave autograd's in-place
    accumulation of gradients as it is)."""
    with profile(profile_memory=True) as prof:
        run()

    def allocations(nodes: list) -> list:
        found = [n for n in nodes if n.tag == _EventType.Allocation]
        return found + [a for n in nodes for a in allocations(n.children)]

    found = allocations(prof.profiler.kineto_results.experimental_event_tree())
    first = min(found, key=lambda n: n.start_time_ns).extra_fields
    start = first.total_allocated - first.alloc_size  # the total before the first allocation
    return max(n.extra_fields.total_allocated for n in found) - start


@pytest.mark.parametrize("folded", [True, False])
def test_gramian_pass_does_not_hold_the_gradients_above_and_below_the_relu(
    folded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CNN whose first map is its largest activation: the gradients above and below its ReLU
    # (3 MiB each, float64) were both in memory in the Gramian's pass (the graph kept: 2.0 times
    # one of them at the peak); folded, the pass holds one of them, then the rule its masked copy,
    # in place (1.21 times, with the first convolution's patches, fresh memory, by blocks of one
    # sample).
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(24, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )  # fmt: skip
    x = torch.randn(16, 3, 32, 32)
    gradient_bytes = 16 * 24 * 32 * 32 * x.element_size()
    if not folded:
        monkeypatch.setattr(_streaming, "FOLD_MIN_BYTES", gradient_bytes + 1)
    # the first convolution's patches (fresh memory in the Gramian's step) by blocks of one
    # sample, 0.07 times the gradient: by blocks of 8 (the default), 0.58 times, at its rule
    monkeypatch.setattr(conv_module, "PATCH_BYTES", 1 << 18)
    engine = Engine(model, batch_dim=0)

    def step() -> int:  # the Gramian's peak; the losses and their graph freed at its end
        losses = _losses(model, x)
        return _peak_allocated(lambda: engine.compute_gramian(losses))

    for _ in range(2):  # the engine's buffers kept from the first steps
        step()
    peak = step()
    if folded:
        assert peak <= 1.5 * gradient_bytes, peak / gradient_bytes
    else:  # the measure sees the pair
        assert peak >= 2 * gradient_bytes, peak / gradient_bytes


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")
@pytest.mark.parametrize("where", ["module", "global"])
def test_a_non_full_backward_hook_disables_the_fold(where: str, folds: list[str]) -> None:
    """A non-full backward hook (``Module.register_backward_hook``, as guided backpropagation
    uses; or a module-wide one) sits on the node of the activation's output, which the fold would
    not run: no fold then, and the Gramian is that of the hooked graph (review: 0.019 off)."""
    torch.manual_seed(0)
    model = _cnn(nn.ReLU()).double()

    def guided(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
        return tuple(None if g is None else g.clamp(min=0) for g in grad_input)

    if where == "module":
        handle = model[1].register_backward_hook(guided)
    else:
        handle = torch.nn.modules.module.register_module_backward_hook(guided)
    try:
        engine = Engine(model, batch_dim=0)
        x = _input("cnn", (6, 3, 8, 8))
        losses = _losses(model, x)
        G = engine.compute_gramian(losses)
        assert not [name for name in folds if name.startswith("in place")]
        if where == "module":  # (a global one also changes the layers' parameter gradients,
            # which the closed-form rules do not see)
            expected = brute_force_gramian(losses, list(model.parameters()))
            assert (G - expected).abs().max() <= 1e-10 * expected.abs().max()
    finally:
        handle.remove()
