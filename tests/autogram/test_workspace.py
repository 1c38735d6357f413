"""The buffers that an engine keeps from step to step for its rules (see ``_workspace.py``): the
same results as fresh memory, one buffer per module and role whatever the batch sizes, freed when
the engine is closed or deleted."""

import gc
import weakref

import pytest
import torch
from torch import Tensor, nn

import torchjd.autogram._rules._conv as conv_module
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autogram._workspace import Workspaces, empty


@pytest.fixture
def grouped_path(monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """Forces the per-objective gradients of convolutions from grouped convolutions, formed whole
    by blocks of samples (the rule that takes its buffer from the engine), and records each."""
    formed: list[Tensor] = []
    grouped_jacobian = conv_module._grouped_jacobian

    def spy(*args: object) -> tuple[Tensor, Tensor | None]:
        J, sums = grouped_jacobian(*args)  # type: ignore[arg-type]
        formed.append(J)
        return J, sums

    monkeypatch.setattr(conv_module, "_grouped_is_faster", lambda *args: True)
    monkeypatch.setattr(conv_module, "per_objective_is_cheaper", lambda *args: True)
    monkeypatch.setattr(conv_module, "GROUPED_WHOLE_BYTES", 0)
    monkeypatch.setattr(conv_module, "_grouped_jacobian", spy)
    return formed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1), nn.Flatten()
    ).double()


def _losses(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).pow(2).mean(dim=1)


def _step(engine: Engine, model: nn.Module, x: Tensor, fused: bool) -> list[Tensor]:
    """The Gramian (or the fused step's weights) and the gradients of the weighted losses."""
    model.zero_grad()
    losses = _losses(model, x)
    if fused:
        weights = engine.backward(losses, UPGradWeighting())
        return [weights, *(p.grad for p in model.parameters())]  # type: ignore[misc]
    gramian = engine.compute_gramian(losses)
    losses.backward(torch.ones_like(losses))
    return [gramian, *(p.grad for p in model.parameters())]  # type: ignore[misc]


def _assert_step_as_fresh(engine: Engine, model: nn.Module, batch: int, fused: bool) -> None:
    """A step of ``engine`` on a batch of ``batch`` random inputs gives bitwise the results of a
    new engine (fresh buffers) on a copy of ``model``."""
    x = torch.randn(batch, 3, 7, 7, dtype=torch.float64)
    reference_model = _model()
    reference_model.load_state_dict(model.state_dict())
    with Engine(reference_model, batch_dim=0) as fresh:
        expected = _step(fresh, reference_model, x, fused)
    results = _step(engine, model, x, fused)
    for result, reference in zip(results, expected, strict=True):
        assert torch.equal(result, reference)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_reused_buffers_give_the_results_of_fresh_memory(fused, keep, grouped_path, monkeypatch):
    """Over steps of varying batch sizes, an engine that reuses its buffers gives bitwise the
    Gramians, weights and gradients of a new engine at each step (fresh buffers), the per-objective
    gradients kept for the fused step or not; in the fused step, it holds one buffer per
    convolution, of the last step's shape, reused as long as the shape stays; in the Gramian's
    step (compute_gramian), none (fresh memory, freed with the step)."""
    monkeypatch.setattr(conv_module, "keeps_jacobian", lambda *args: keep)
    model = _model()
    engine = Engine(model, batch_dim=0)
    pointers = []
    for batch in [4, 4, 2, 5, 5, 4]:
        _assert_step_as_fresh(engine, model, batch, fused)
        buffers = list(engine._workspaces._buffers.values())
        if not fused:
            assert not buffers
            continue
        assert len(buffers) == 2  # one per convolution, whatever the batch sizes before
        assert all(buffer.shape[1] == batch for buffer in buffers)
        pointers.append([buffer.data_ptr() for buffer in buffers])
    if fused:
        assert pointers[1] == pointers[0]
        assert pointers[4] == pointers[3]
    assert grouped_path
    assert all(J.shape[1] in (2, 4, 5) for J in grouped_path)


@pytest.mark.parametrize("fused", [False, True])
def test_reused_patch_buffers_give_the_results_of_fresh_memory(fused, monkeypatch):
    """The patches of the per-objective path with the bias folded in (a row of ones), by blocks of
    two samples (the last block smaller for odd batches): over steps of varying batch sizes,
    bitwise the results of a new engine at each step; in the fused step, one buffer of patches
    per convolution, the size of a block; in the Gramian's step, none (fresh memory)."""
    monkeypatch.setattr(conv_module, "_grouped_is_faster", lambda *args: False)
    monkeypatch.setattr(conv_module, "per_objective_is_cheaper", lambda *args: True)
    monkeypatch.setattr(conv_module, "LOOP_MIN_WIDTH", 1 << 30)
    monkeypatch.setattr(conv_module, "PATCH_BYTES", 2 * 28 * 25 * 8)  # two samples of the first
    model = _model()
    engine = Engine(model, batch_dim=0)
    for batch in [4, 5, 3, 4]:
        _assert_step_as_fresh(engine, model, batch, fused)
        patches = [b for (_, role), b in engine._workspaces._buffers.items() if role == "patches"]
        if not fused:
            assert not patches
            continue
        assert len(patches) == 2
        assert patches[0].shape[0] == 2  # the first convolution: blocks of two samples
        assert torch.all(patches[0][:, -1] == 1)  # the row of ones


def test_buffers_freed_on_close_and_on_deletion(grouped_path):
    model = _model()
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    for close in [True, False]:
        engine = Engine(model, batch_dim=0)
        _step(engine, model, x, fused=True)
        buffers = [weakref.ref(b) for b in engine._workspaces._buffers.values()]
        assert len(buffers) == 2
        assert all(ref() is not None for ref in buffers)
        grouped_path.clear()  # the spy's references
        if close:
            engine.close()
            assert len(engine._workspaces) == 0
        else:
            del engine
        gc.collect()
        assert all(ref() is None for ref in buffers)


def test_empty_outside_a_step_or_the_cpu_allocates():
    """Outside an active set of buffers, or for another device than the CPU, each call gets new
    memory; inside, the same buffer per owner and role while the shape and dtype stay, a new one
    (replacing it) when they change."""
    like = torch.zeros(1)
    a, b = empty("m", "r", (2, 3), like), empty("m", "r", (2, 3), like)
    assert a.data_ptr() != b.data_ptr()
    workspaces = Workspaces()
    with workspaces.active(fused=True):
        first = empty("m", "r", (2, 3), like)
        assert empty("m", "r", (2, 3), like) is first
        other_role = empty("m", "s", (2, 3), like)
        assert other_role.data_ptr() != first.data_ptr()
        assert empty("m", "r", (3, 2), like).shape == (3, 2)
        assert empty("m", "r", (3, 2), like.double()).dtype == torch.float64
        assert len(workspaces) == 2
        meta = empty("m", "r", (2, 3), torch.zeros(1, device="meta"))
        assert meta.device.type == "meta"
        assert len(workspaces) == 2
    assert empty("m", "r", (2, 3), like) is not empty("m", "r", (2, 3), like)
    workspaces.clear()
    assert len(workspaces) == 0
