"""The measurements of the demo's runner, on a method whose behaviour is known."""

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import torchjd._demo._memory as memory
from torchjd._cli import _aggregator_classes
from torchjd._demo._data import Split, batch_schedule
from torchjd._demo._methods import Method, MultiTask
from torchjd._demo._runner import _train


class _Seesaw(Method):
    """After its k-th step, objective 0 of any batch is k % 2: it goes up at every other step."""

    name = "seesaw"

    def __init__(self) -> None:
        self.model = nn.Linear(1, 1)
        self.k = 0
        super().__init__(lr=0.1)

    def objectives(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.tensor([float(self.k % 2), 0.5])

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        before = self.objectives(x, y)
        self.k += 1
        return before

    def per_sample_losses(self, split: Split) -> Tensor:
        return torch.arange(len(split), dtype=torch.float32)

    def accuracies(self, split: Split) -> list[Tensor]:
        return [torch.tensor(0.25)]


def test_runner_counts_the_steps_with_a_loss_up():
    data = Split(torch.zeros(20, 64), torch.zeros(20, dtype=torch.long))
    schedule = batch_schedule(len(data), batch_size=4, epochs=3, seed=0)
    result = _train(_Seesaw(), "instance-wise", data, data, schedule, torch.device("cpu"))
    assert result.steps == 15
    assert len(result.step_times) == 15
    assert result.steps_with_increase == 8  # steps 1, 3, ..., 15 (0 → 1)
    assert result.share_increased == pytest.approx(8 / 15)
    assert len(result.train) == len(result.test) == 4  # before training, then after each epoch
    last = result.test[-1]
    assert last.loss == pytest.approx(9.5)  # the mean of 0, ..., 19
    assert last.worst_decile == pytest.approx(18.5)  # the mean of the largest two: 18 and 19
    assert last.accuracies == [0.25]


def test_batch_schedule_covers_every_sample_once_per_epoch():
    schedule = batch_schedule(10, batch_size=3, epochs=2, seed=4)
    for epoch in schedule:
        assert [len(b) for b in epoch] == [3, 3, 3, 1]
        assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(schedule[0]), torch.cat(schedule[1]))  # reshuffled
    assert all(
        torch.equal(a, b)
        for a, b in zip(schedule[0], batch_schedule(10, 3, 2, seed=4)[0], strict=True)
    )  # the same for every method


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_sees_a_tensor_allocated_and_freed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(memory, "_map_large_allocations", lambda: None)  # 64 MiB is mapped anyway
    meter = memory.PeakMemory(torch.device("cpu"))
    meter.start()
    assert meter.peak_mib() < 32
    big = torch.ones(16 * 2**20)  # 64 MiB, touched
    del big
    assert meter.peak_mib() >= 60


@pytest.mark.parametrize("name", sorted(_aggregator_classes()))
def test_every_selectable_aggregator_trains_the_multi_task_network(name: str):
    """Each name that ``--aggregators`` accepts makes a step of the multi-task part."""
    method = MultiTask(name, _aggregator_classes()[name](), lr=0.1)
    x, y = torch.randn(8, 64), torch.arange(8)
    before = [p.clone() for p in method.trunk.parameters()]
    for _ in range(2):
        losses = method.step(x, y)
    assert losses.shape == (3,)
    assert losses.isfinite().all()
    assert all(p.isfinite().all() for p in method.model.parameters())
    assert any(
        not torch.equal(b, p) for b, p in zip(before, method.trunk.parameters(), strict=True)
    )
