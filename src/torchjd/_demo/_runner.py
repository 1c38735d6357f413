"""Trains every method of the demo on the same batches and collects what the report shows."""

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torchjd._demo._config import DemoConfig
from torchjd._demo._data import Split, batch_schedule, load
from torchjd._demo._memory import PeakMemory
from torchjd._demo._methods import INSTANCE_WISE, Method, MultiTask

WORST_FRACTION = 0.1


@dataclass
class Metrics:
    """What one evaluation of a model on a split gives."""

    accuracies: list[float]  # one per task
    loss: float  # mean per-sample loss
    worst_decile: float  # mean of the worst 10 % of the per-sample losses
    task_losses: list[float]  # mean loss of each task (multi-task part only)


@dataclass
class RunResult:
    name: str
    part: str  # "instance-wise" or "multi-task"
    train: list[Metrics] = field(default_factory=list)  # one per epoch, the first before training
    test: list[Metrics] = field(default_factory=list)
    steps: int = 0
    steps_with_increase: int = 0  # steps after which some objective of the batch was higher
    step_times: list[float] = field(default_factory=list)  # seconds
    peak_mib: float = float("nan")

    @property
    def share_increased(self) -> float:
        return self.steps_with_increase / max(self.steps, 1)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * statistics.median(self.step_times) if self.step_times else float("nan")


@dataclass
class DemoResult:
    runs: list[RunResult]
    interrupted: bool
    train_size: int
    test_size: int


@torch.no_grad()
def _evaluate(method: Method, split: Split) -> Metrics:
    losses = method.per_sample_losses(split)
    k = max(1, int(WORST_FRACTION * len(losses)))
    task_losses = method.task_losses(split).tolist() if isinstance(method, MultiTask) else []
    return Metrics(
        accuracies=[float(a) for a in method.accuracies(split)],
        loss=float(losses.mean()),
        worst_decile=float(losses.topk(k).values.mean()),
        task_losses=task_losses,
    )


def _train(
    method: Method,
    part: str,
    train: Split,
    test: Split,
    schedule: list[list[Tensor]],
    device: torch.device,
) -> RunResult:
    from tqdm import tqdm

    method.model.to(device)
    result = RunResult(method.name, part)
    result.train.append(_evaluate(method, train))
    result.test.append(_evaluate(method, test))
    memory = PeakMemory(device)
    peaks = []
    total = sum(len(epoch) for epoch in schedule)
    with tqdm(total=total, desc=f"{part}: {method.name}", file=sys.stderr) as bar:
        for epoch in schedule:
            memory.start()  # the peak of the steps, without the evaluations between the epochs
            for indices in epoch:
                x, y = train.x[indices.to(device)], train.y[indices.to(device)]
                _synchronize(device)
                start = time.perf_counter()
                before = method.step(x, y)
                _synchronize(device)
                result.step_times.append(time.perf_counter() - start)
                with torch.no_grad():  # the same batch, after the update
                    after = method.objectives(x, y)
                result.steps += 1
                result.steps_with_increase += int((after > before).any())
                bar.update()
            peaks.append(memory.peak_mib())
            result.train.append(_evaluate(method, train))
            result.test.append(_evaluate(method, test))
            bar.set_postfix(train_loss=f"{result.train[-1].loss:.3f}")
    result.peak_mib = max(peaks, default=float("nan"))
    return result


def _warm_up(method: Method, train: Split, indices: Tensor, device: torch.device) -> None:
    """One step of a throwaway copy of the method, so that the one-off costs of a first call
    (lazy initialisations, caches of the allocator) count neither in the time nor in the memory of
    the run."""
    method.model.to(device)
    method.step(train.x[indices.to(device)], train.y[indices.to(device)])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _multi_task_methods(names: tuple[str, ...]) -> list[Callable[[float], Method]]:
    import torchjd.aggregation

    def factory(name: str) -> Callable[[float], Method]:
        return lambda lr: MultiTask(name, getattr(torchjd.aggregation, name)(), lr)

    return [factory(name) for name in names]


def run_demo(config: DemoConfig) -> DemoResult:
    """Trains every method in turn (same seed, same batches); a Ctrl-C stops the training and
    returns the runs finished so far, with ``interrupted=True``."""
    device = torch.device(config.device)
    train, test = load(config.seed, device, config.max_train_samples)
    schedule = batch_schedule(len(train), config.batch_size, config.epochs, config.seed)
    plan = [("instance-wise", factory) for factory in INSTANCE_WISE] + [
        ("multi-task", factory) for factory in _multi_task_methods(config.aggregators)
    ]
    result = DemoResult([], interrupted=False, train_size=len(train), test_size=len(test))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The networks are tiny: intra-op threads only add synchronisation, which is very slow on
        # a busy machine.
        torch.set_num_threads(1)
    try:
        for part, factory in plan:
            _warm_up(factory(config.lr), train, schedule[0][0], device)
            torch.manual_seed(config.seed)  # the same initial parameters for every method
            result.runs.append(_train(factory(config.lr), part, train, test, schedule, device))
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        torch.set_num_threads(threads)
    return result
