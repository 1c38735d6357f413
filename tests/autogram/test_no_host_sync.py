"""The engine's step never reads a tensor's value on the host (``.item()``, ``bool(t)``,
``.tolist()``, ``.cpu()``...): on CUDA, each such read would stall the step until the device
catches up. On CPU, the test makes every such read from Python raise while the engine runs
(reads inside torch's C++ kernels, e.g. ``torch.nonzero``, are not seen; the engine uses none).
The weighting here is sync-free; UPGrad's solver reads its convergence test on the host."""

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from torchjd.aggregation import MeanWeighting
from torchjd.autogram import Engine

_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


@contextlib.contextmanager
def host_reads_raise() -> Iterator[None]:
    originals = {name: getattr(Tensor, name) for name in _HOST_READS}

    def refuse(name: str) -> Callable[..., object]:
        def method(self: Tensor, *args: object, **kwargs: object) -> object:
            raise AssertionError(f"host synchronisation: Tensor.{name}")

        return method

    for name in _HOST_READS:
        setattr(Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(Tensor, name, original)


def test_the_guard_catches_host_reads():
    with host_reads_raise(), pytest.raises(AssertionError, match=r"Tensor\.__bool__"):
        bool(torch.ones(1))
    assert bool(torch.ones(1))  # restored


def mlp() -> tuple[nn.Module, Tensor]:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(5, 6)


def cnn() -> tuple[nn.Module, Tensor]:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 5 * 5, 3),
    )  # fmt: skip
    return model, torch.randn(4, 2, 5, 5)


def transformer() -> tuple[nn.Module, Tensor]:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(11, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(self.layer(self.embedding(tokens)).mean(dim=1))

    return Model(), torch.randint(0, 11, (4, 7))


def rnn() -> tuple[nn.Module, Tensor]:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.lstm(x)[0][:, -1])

    return Model(), torch.randn(3, 6, 4)


@pytest.mark.parametrize("make", [mlp, cnn, transformer, rnn])
@pytest.mark.parametrize("fused", [False, True])
def test_step_without_host_reads(make, fused):
    torch.manual_seed(0)
    model, x = make()
    targets = torch.zeros(x.shape[0], dtype=torch.long)
    with Engine(model, batch_dim=0) as engine:
        losses = nn.functional.cross_entropy(model(x), targets, reduction="none")
        weighting = MeanWeighting()
        with host_reads_raise():
            if fused:
                weights = engine.backward(losses, weighting)
            else:
                gramian = engine.compute_gramian(losses)
                weights = weighting(gramian)
                losses.backward(weights)
    assert all(p.grad is not None for p in model.parameters())
    assert weights.shape == losses.shape
