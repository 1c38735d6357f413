"""Bad inputs are refused with a message naming the fix, and leave no state behind."""

import pytest
import torch
from torch import nn

from tests.autogram._helpers import assert_gramian_exact
from torchjd.autogram import Engine, register_rule


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))


def test_no_module():
    with pytest.raises(ValueError, match="at least one module"):
        Engine(batch_dim=0)


def test_not_a_module():
    with pytest.raises(TypeError, match=r"`modules\[1\]` to be a torch.nn.Module, got Tensor"):
        Engine(nn.Linear(2, 2), torch.zeros(2), batch_dim=0)


@pytest.mark.parametrize("batch_dim", [1.0, "0", True])
def test_batch_dim_type(batch_dim):
    with pytest.raises(TypeError, match="`batch_dim` to be an int or None"):
        Engine(nn.Linear(2, 2), batch_dim=batch_dim)


def test_batch_dim_keyword_is_required():
    with pytest.raises(TypeError, match="batch_dim"):
        Engine(nn.Linear(2, 2))  # type: ignore[call-arg]


def test_output_not_a_tensor():
    engine = Engine(mlp(), batch_dim=0)
    with pytest.raises(TypeError, match="`output` to be a Tensor, got list"):
        engine.compute_gramian([1.0])  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_dim", [2, -3])
def test_batch_dim_out_of_range(batch_dim):
    model = mlp()
    engine = Engine(model, batch_dim=batch_dim)
    with pytest.raises(ValueError, match=r"`batch_dim` is out of range .* shape \(6, 2\)"):
        engine.compute_gramian(model(torch.randn(6, 5)))
    engine.close()


def test_batch_dim_with_scalar_output():
    model = mlp()
    engine = Engine(model, batch_dim=0)
    with pytest.raises(ValueError, match=r"`output` is a scalar.*batch_dim=None"):
        engine.compute_gramian(model(torch.randn(6, 5)).sum())


def test_output_independent_of_modules():
    model = mlp()
    engine = Engine(model, batch_dim=0)
    with pytest.raises(ValueError, match="does not depend on the trainable parameters"):
        engine.compute_gramian(torch.randn(6, requires_grad=True) * 2)
    other = nn.Linear(5, 1)
    model(torch.randn(6, 5))
    with pytest.raises(ValueError, match="does not depend on the outputs of the engine's modules"):
        engine.compute_gramian(other(torch.randn(6, 5)).squeeze(1))
    # the state was cleared: the next step works
    assert_gramian_exact([model], lambda: model(torch.randn(6, 5)).sum(1), 0)


def test_forward_that_never_reached_output():
    model = mlp()
    engine = Engine(model, batch_dim=0)
    model(torch.randn(6, 5))  # e.g. a validation pass with grad enabled
    losses = model(torch.randn(6, 5)).sum(1)
    with pytest.raises(ValueError, match=r"never reached `output`.*torch.no_grad\(\)"):
        engine.compute_gramian(losses)
    engine.close()
    assert_gramian_exact([model], lambda: model(torch.randn(6, 5)).sum(1), 0)


@pytest.mark.parametrize("layers", [1, 2])
def test_a_view_output_modified_in_place_is_named_in_the_error(layers: int):
    """A Linear on 3-D inputs returns a view; an in-place ReLU after it rebases the view's graph,
    which the engine cannot follow (known limitation): the error says so and gives the fix, and
    the engine stays usable (it said to use torch.no_grad, which was misleading)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 2))[: layers + 1]
    engine = Engine(model, batch_dim=0)
    losses = model(torch.randn(6, 4, 5)).flatten(1).sum(1)
    with pytest.raises(ValueError, match=r"modified in place.*inplace=True.*out-of-place"):
        engine.compute_gramian(losses)
    engine.close()
    model[1].inplace = False  # the fix the error gives
    assert_gramian_exact([model], lambda: model(torch.randn(6, 4, 5)).flatten(1).sum(1), 0)


@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.BatchNorm1d(4),
        lambda: nn.BatchNorm1d(4, track_running_stats=False).eval(),
        lambda: nn.BatchNorm1d(4, affine=False),
    ],
)
def test_batch_norm_with_batch_dim(norm):
    model = nn.Sequential(nn.Linear(5, 4), norm(), nn.Linear(4, 1))
    engine = Engine(model, batch_dim=0)
    with pytest.raises(ValueError, match=r"batch statistics.*batch_dim=None"):
        engine.compute_gramian(model(torch.randn(6, 5)).squeeze(1))
    engine.close()


def test_batch_norm_without_batch_dim_or_in_eval_mode():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(6, 5)
    assert_gramian_exact([model], lambda: model(x).squeeze(1) ** 2, None)
    # the recomputation of the forward did not update the running statistics a second time
    expected = 0.1 * (x @ model[0].weight.T + model[0].bias).mean(0)
    torch.testing.assert_close(model[1].running_mean, expected)
    model.eval()
    assert_gramian_exact([model], lambda: model(x).squeeze(1) ** 2, 0)


def test_no_batch_dimension_in_a_module_output():
    class Flatten(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(x.reshape(-1, 3)).reshape(x.shape)

    model = Flatten()
    engine = Engine(model, batch_dim=0)
    with pytest.raises(ValueError, match=r"cannot find the batch dimension.*batch_dim=None"):
        engine.compute_gramian(model(torch.randn(4, 2, 3)).sum((1, 2)))
    assert_gramian_exact([model], lambda: model(torch.randn(4, 2, 3)).sum((1, 2)), None)


def test_tied_parameters():
    """Once refused; now the two layers' Gramian comes from one rule for both (see
    test_tied_across_modules.py). Still refused: a module's own parameter tied to one of a hooked
    module inside it."""
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    x = torch.randn(4, 3)
    assert_gramian_exact([model], lambda: model(x).pow(2).sum(1), 0)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 3)
            self.scale = self.inner.weight

        def forward(self, x):
            return self.inner(x) @ self.scale

    with pytest.raises(ValueError, match="shared by the hooked modules Outer and Linear"):
        Engine(Outer(), batch_dim=0)


def test_register_rule_checks():
    with pytest.raises(TypeError, match=r"`module_type` to be a subclass of torch\.nn\.Module"):
        register_rule(int, lambda m, c: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`rule` to be callable"):
        register_rule(nn.Linear, 3)  # type: ignore[arg-type]


def test_state_is_reset_when_a_rule_raises():
    class Boom(nn.Linear):
        pass

    def failing_rule(module, calls):
        raise RuntimeError("boom")

    register_rule(Boom, failing_rule)
    model = nn.Sequential(Boom(3, 2))
    engine = Engine(model, batch_dim=0)
    with pytest.raises(RuntimeError, match="boom"):
        engine.compute_gramian(model(torch.randn(4, 3)).sum(1))
    assert not engine._calls
    assert engine._recording
