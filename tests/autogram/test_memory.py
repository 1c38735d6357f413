"""No leak: the memory that the engine holds does not grow over many steps."""

import gc
import warnings
import weakref

import torch
from torch import nn

from torchjd.aggregation import MeanWeighting
from torchjd.autogram import Engine


def test_memory_is_flat_over_many_steps():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 1))
    engine = Engine(model, batch_dim=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    weighting = MeanWeighting()
    outputs: list[weakref.ref] = []
    gc.collect()
    live_before = _live_tensors()
    for step in range(1000):
        losses = model(torch.randn(5, 3)).squeeze(1).pow(2)
        losses.backward(weighting(engine.compute_gramian(losses)))
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            outputs.append(weakref.ref(losses))
        del losses
    gc.collect()
    live_after = _live_tensors()
    assert all(ref() is None for ref in outputs)  # no step's graph is kept alive
    assert live_after <= live_before + 5
    assert not engine._calls


def _live_tensors() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some lazily deprecated torch objects
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_recording_a_call_does_not_keep_its_output_alive():
    # Autograd frees the output of a Linear followed by a ReLU (ReLU saves its own result and
    # addmm its input): recording the call must not keep it, or the forward pass would hold one
    # more activation per hooked module than the plain model does.
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    engine = Engine(model, batch_dim=0)
    kept: list[weakref.ref] = []
    model[0].register_forward_hook(lambda module, args, output: kept.append(weakref.ref(output)))
    losses = model(torch.randn(5, 3)).squeeze(1)
    assert kept[0]() is None
    gramian = engine.compute_gramian(losses)  # the rules do not need the output's values
    rows = [
        torch.cat(
            [g.flatten() for g in torch.autograd.grad(loss, model.parameters(), retain_graph=True)]
        )
        for loss in losses
    ]
    J = torch.stack(rows)
    torch.testing.assert_close(gramian, J @ J.T)
