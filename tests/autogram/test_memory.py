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
