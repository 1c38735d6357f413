"""A copy of a model that an engine hooks (``copy.deepcopy``, ``pickle``, ``torch.save``, as
Lightning and checkpointing tools do) is a plain model: its calls neither reach the engine nor
fail, and the engine stays exact on the original. A copy of an object holding both the model and
its engine is a working pair, as in the published library."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from tests.reference.jacobians import brute_force_gramian
from torchjd.autogram import Engine


def _deepcopy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _pickled(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


def _saved(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copy_of", [_deepcopy, _pickled, _saved])
def test_a_copy_of_a_hooked_model_is_a_plain_model(copy_of):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    with Engine(model, batch_dim=0) as engine:
        clone = copy_of(model)
        losses = model(x).squeeze(1)  # recorded by the engine
        clone(x).sum().backward()  # not recorded, and no error
        assert all(p.grad is not None for p in clone.parameters())
        G = engine.compute_gramian(losses)
        expected = brute_force_gramian(model(x).squeeze(1), list(model.parameters()))
        assert (G - expected).abs().max() <= 1e-10 * expected.abs().max()
        with Engine(clone, batch_dim=0) as second:  # the copy can have its own engine
            G_clone = second.compute_gramian(clone(x).squeeze(1))
        assert (G_clone - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_a_shallow_copy_of_a_hooked_model_raises_clearly():
    """copy.copy (as nn.DataParallel's replicas) shares the hooks: its call is refused with an
    error that says so (it was a KeyError), and the engine stays usable on the original."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    with Engine(model, batch_dim=0) as engine:
        with pytest.raises(RuntimeError, match="shallow copy"):
            copy.copy(model)(x)
        G = engine.compute_gramian(model(x).squeeze(1))
        expected = brute_force_gramian(model(x).squeeze(1), list(model.parameters()))
        assert (G - expected).abs().max() <= 1e-10 * expected.abs().max()


class _Holder(nn.Module):
    """A model with its engine (as a LightningModule that creates it in ``__init__``)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(torch.float64)
        self.engine = Engine(self.model, batch_dim=0)


class _SelfHolder(nn.Module):
    """A model holding an engine over itself (the engine's module holds the engine)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(torch.float64)
        self.engine = Engine(self, batch_dim=0)

    @property
    def model(self) -> nn.Module:
        return self.layers


@pytest.mark.parametrize("copy_of", [_deepcopy, _pickled, _saved])
@pytest.mark.parametrize("make", [_Holder, _SelfHolder])
def test_a_copy_of_a_model_and_its_engine_is_a_working_pair(copy_of, make):
    """Copying an object that holds both (SWA/EMA callbacks deep-copy it; it may be saved whole)
    gives an engine over the copied model, exact on it, while the original pair stays exact and
    independent."""
    torch.manual_seed(0)
    holder = make()
    x = torch.randn(5, 3, dtype=torch.float64)
    clone = copy_of(holder)
    assert clone.engine is not holder.engine
    with torch.no_grad():
        clone.model[0].weight.add_(1.0)  # the two models now differ
    for _ in range(2):
        for pair in (holder, clone):
            losses = pair.model(x).squeeze(1)
            G = pair.engine.compute_gramian(losses)  # (the graph is kept)
            expected = brute_force_gramian(losses, list(pair.model.parameters()))
            assert (G - expected).abs().max() <= 1e-10 * expected.abs().max()
    holder.engine.close()
    closed = copy_of(holder)  # a closed engine copies as a closed one: no hook on the copy
    assert not closed.engine._handles
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in closed.modules())
    clone.engine.close()  # the copy's hooks are its own: closing removes them all
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in clone.modules())


class _LocalScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def test_saving_a_model_alone_does_not_take_its_engine():
    """The engine (and a rule that cannot be pickled, here a closure) stays out of a model saved
    alone: saving works, and the loaded model is plain."""
    from torchjd.autogram import register_rule

    factor = 1.0
    register_rule(  # a closure: not picklable
        _LocalScale, lambda module, calls: factor * _scale_gramian(calls)
    )
    model = nn.Sequential(_LocalScale(), nn.Linear(3, 1).to(torch.float64))
    x = torch.randn(5, 3, dtype=torch.float64)
    with Engine(model, batch_dim=0) as engine:
        clone = _saved(model)
        clone(x).sum().backward()  # not recorded, and no error
        losses = model(x).squeeze(1)
        G = engine.compute_gramian(losses)
        expected = brute_force_gramian(losses, list(model.parameters()))
        assert (G - expected).abs().max() <= 1e-10 * expected.abs().max()


def _scale_gramian(calls) -> torch.Tensor:
    """The Gramian of ``x * s`` w.r.t. ``s`` (batch dimension 0)."""
    J = sum((call.grad_output(0) * call.args[0]).movedim(1, 0) for call in calls)  # [B, R, 3]
    J = J.flatten(end_dim=1)
    return J @ J.T
