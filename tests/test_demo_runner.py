"""The measurements of the demo's runner, on a method whose behaviour is known."""

import subprocess
import sys
import textwrap
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


_HEAP_CACHED_BEFORE_START = textwrap.dedent(
    """
    import ctypes, ctypes.util, torch
    import torchjd._demo._memory as memory
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: up to 32 MiB on the heap
    libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: the heap keeps up to 1 GiB it does not use
    kept = [torch.ones(30 * 2**18) for _ in range(4)]  # 4 x 30 MiB
    del kept  # 120 MiB free and resident in the heap
    memory._map_large_allocations = lambda: None
    meter = memory.PeakMemory(torch.device("cpu"))
    meter.start()
    big = torch.ones(16 * 2**20)  # 64 MiB: fits in the free 120 MiB
    del big
    print(meter.peak_mib())
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_sees_a_tensor_that_reuses_memory_freed_before_the_start():
    """Memory the heap cached before ``start()`` is given back, so reusing it counts.

    In a fresh process: the state of the heap is the point, and changing glibc's threshold here
    would change it for the rest of the tests.
    """
    run = subprocess.run(
        [sys.executable, "-c", _HEAP_CACHED_BEFORE_START],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert float(run.stdout.split()[-1]) >= 60


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
