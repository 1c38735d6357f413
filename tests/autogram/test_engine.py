"""The engine's Gramian equals the brute-force one in every situation users hit."""

import gc

import pytest
import torch
from torch import Tensor, nn

from tests.autogram._helpers import assert_gramian_exact, trainable
from tests.reference.jacobians import brute_force_gramian
from torchjd.autogram import Engine


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_vector_of_losses(batch_dim):
    model, x = mlp(), torch.randn(6, 5)
    assert_gramian_exact([model], lambda: model(x).pow(2).sum(dim=1), batch_dim)


@pytest.mark.parametrize("batch_dim", [0, -2, None])
def test_matrix_batch_by_tasks(batch_dim):
    model, x = mlp(), torch.randn(6, 5)
    assert_gramian_exact([model], lambda: model(x).pow(2), batch_dim)


def test_batch_not_first():
    model, x = mlp(), torch.randn(6, 5)
    assert_gramian_exact([model], lambda: model(x).pow(2).T.contiguous(), 1)  # [tasks, batch]
    assert_gramian_exact([model], lambda: model(x).pow(2).T, -1)


def test_three_dimensional_output_with_positions():
    model, x = mlp(), torch.randn(6, 4, 5)  # [batch, positions, features]
    assert_gramian_exact([model], lambda: model(x).sin(), 0)
    assert_gramian_exact([model], lambda: model(x).sin().transpose(0, 1), 1)


def test_scalar_output():
    model, x = mlp(), torch.randn(6, 5)
    G = assert_gramian_exact([model], lambda: model(x).pow(2).mean(), None)
    assert G.shape == (1, 1)


def test_single_sample_vector():
    model = mlp()
    assert_gramian_exact([model], lambda: model(torch.randn(5)).exp(), None)


def test_inplace_activation_after_linear():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    x = torch.randn(7, 5)
    assert_gramian_exact([model], lambda: model(x).squeeze(1) ** 2, 0)


def test_partial_jacobian_descent():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    x = torch.randn(6, 5)
    before = [p.detach().clone() for p in model[0].parameters()]
    G = assert_gramian_exact([model[2:]], lambda: model(x).squeeze(1) ** 2, 0)
    full = brute_force_gramian(model(x).squeeze(1) ** 2, trainable(model))
    assert not torch.allclose(G, full)  # the first layer's parameters are left out
    assert all(torch.equal(a, p) for a, p in zip(before, model[0].parameters(), strict=True))


def test_module_called_several_times_has_cross_terms():
    layer, head = nn.Linear(4, 4), nn.Linear(4, 1)
    x = torch.randn(5, 4)

    def forward():
        return head(torch.tanh(layer(torch.tanh(layer(x)))) + layer(x)).squeeze(1) ** 2

    for batch_dim in [0, None]:
        assert_gramian_exact([layer, head], forward, batch_dim)


class Affine(nn.Module):
    """Direct parameters and a child; not covered by any built-in rule (generic fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3))
        self.child = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.child(x * self.scale) + self.scale


def test_module_with_direct_parameters_and_children():
    model = nn.Sequential(Affine(), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(4, 3)
    for batch_dim in [0, None]:
        assert_gramian_exact([model], lambda: model(x).pow(2), batch_dim)


def test_generic_module_called_recursively():
    cell = Affine()
    x = torch.randn(4, 3)
    for batch_dim in [0, None]:
        assert_gramian_exact([cell], lambda: cell(torch.tanh(cell(x))).pow(2).sum(1), batch_dim)


def test_frozen_parameters_are_excluded():
    model = mlp()
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)
    x = torch.randn(6, 5)
    assert_gramian_exact([model], lambda: model(x).pow(2).sum(1), 0)
    assert_gramian_exact([model], lambda: model(x).pow(2).sum(1), None)


def test_frozen_after_construction():
    model = mlp()
    x = torch.randn(6, 5)
    with Engine(model, batch_dim=0) as engine:
        model[4].requires_grad_(False)
        output = model(x).pow(2).sum(1)
        G = engine.compute_gramian(output)
    torch.testing.assert_close(G, brute_force_gramian(output, trainable(model)))


class TupleAndDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> dict[str, object]:
        return {"pair": (self.a(x), x * self.w), "count": 3, "index": torch.arange(2)}


def test_tuple_and_dict_outputs():
    module = TupleAndDict()
    x = torch.randn(4, 3)

    def forward():
        out = module(x)
        first, second = out["pair"]
        return first.sum(1) * second.sum(1) + second[:, 0]

    for batch_dim in [0, None]:
        assert_gramian_exact([module], forward, batch_dim)


def test_several_modules_and_nested_duplicates():
    model = mlp()
    x = torch.randn(6, 5)
    assert_gramian_exact([model[0], model, model[4]], lambda: model(x).pow(2).sum(1), 0)


def test_engine_across_steps_and_models():
    first, second = mlp(), mlp()
    engine = Engine(first, second, batch_dim=0)
    optimizer = torch.optim.SGD([*first.parameters(), *second.parameters()], lr=0.1)
    for step in range(3):
        x = torch.randn(4, 5)
        output = first(x).pow(2).sum(1) + (second(x) if step % 2 else 0 * second(x)).sum(1)
        G = engine.compute_gramian(output)
        torch.testing.assert_close(G, brute_force_gramian(output, trainable(first, second)))
        output.backward(torch.ones_like(output))  # the graph is kept for this
        optimizer.step()
        optimizer.zero_grad()
    engine.close()


def test_weighted_backward_after_compute_gramian():
    model, x = mlp(), torch.randn(6, 5)
    engine = Engine(model, batch_dim=0)
    losses = model(x).pow(2).sum(1)
    engine.compute_gramian(losses)
    weights = torch.rand(6)
    losses.backward(weights)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (model(x).pow(2).sum(1) @ weights).backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_gramian_has_no_graph_and_no_grad_is_left():
    model, x = mlp(), torch.randn(6, 5)
    engine = Engine(model, batch_dim=0)
    G = engine.compute_gramian(model(x).pow(2).sum(1))
    assert G.grad_fn is None
    assert all(p.grad is None for p in model.parameters())


def test_float32_matches_float64():
    model, x = mlp(), torch.randn(16, 5)
    engine = Engine(model, batch_dim=0)
    G64 = engine.compute_gramian(model(x).pow(2).sum(1))
    model.float()
    G32 = engine.compute_gramian(model(x.float()).pow(2).sum(1))
    assert G32.dtype == torch.float32
    assert (G32.double() - G64).abs().max() <= 1e-5 * G64.abs().max()


def test_no_grad_forwards_are_not_recorded():
    model, x = mlp(), torch.randn(6, 5)
    engine = Engine(model, batch_dim=0)
    with torch.no_grad():
        model(x)
    assert_gramian_exact([model], lambda: model(x).pow(2).sum(1), 0)
    engine.close()


def test_close_removes_hooks():
    model = mlp()
    engine = Engine(model, batch_dim=0)
    engine.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_context_manager_and_deletion_remove_hooks():
    model = mlp()
    with Engine(model, batch_dim=None):
        assert any(m._forward_hooks for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    engine = Engine(model, batch_dim=0)
    del engine
    gc.collect()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_repr():
    assert repr(Engine(mlp(), batch_dim=0)) == "Engine(Sequential, batch_dim=0)"
