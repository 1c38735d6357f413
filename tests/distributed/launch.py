"""Runs a function on a local gloo process group of spawned CPU processes, with timeouts
everywhere: a rank that fails or hangs makes the test fail, never wait forever."""

import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Raised = tuple[str, str, str]  # ("raised", exception type, message)


def run_on_ranks(
    worker: Callable[..., Any],
    world_size: int,
    *args: Any,
    collective_timeout_s: float = 15.0,
    timeout_s: float = 60.0,
) -> list[Any]:
    """``[worker(rank, world_size, *args) for rank in range(world_size)]``, each in its own
    process of one gloo group. An exception raised by the worker is returned as ``Raised``."""
    # the fork server imports torch once, and forks every rank from it: 4 imports of torch at once
    # would take most of the time of a test on a small machine (FSDP2 and DTensor import torch's
    # compiler on first use: seconds more)
    multiprocessing.set_forkserver_preload(
        [
            "torch",
            "torch.distributed",
            "torch.distributed.fsdp",
            "torch.distributed.tensor",
            "torch._dynamo",
            "torchjd",
        ]
    )
    folder = Path(tempfile.mkdtemp(prefix="torchjd-dist-"))
    try:
        context = mp.start_processes(
            _entry,
            args=(worker, world_size, str(folder), collective_timeout_s, args),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"The {world_size} ranks did not finish in {timeout_s} s.")
        return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _entry(
    rank: int,
    worker: Callable[..., Any],
    world_size: int,
    folder: str,
    collective_timeout_s: float,
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=collective_timeout_s),
    )
    try:
        result = worker(rank, world_size, *args)
    except Exception as error:  # reported to the test, which asserts on it
        result = ("raised", type(error).__name__, str(error))
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(folder) / f"rank{rank}.pt")
