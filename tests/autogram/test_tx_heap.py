"""The probe that raises glibc's malloc thresholds (``_workspace.raise_heap_thresholds``)."""

import os
import platform
import subprocess
import sys

import pytest
import torch

import torchjd.autogram._workspace as workspace_module
from torchjd.autogram import Engine

_SCRIPT = """
import resource, sys
import torch
from torchjd.autogram import Engine

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

Engine(torch.nn.Linear(2, 1), batch_dim=0)  # raises the thresholds
counts = []
for size in (6 << 20, 4 << 20):
    block = torch.empty(size, dtype=torch.uint8)
    before = faults()
    block.fill_(1)
    counts.append(faults() - before)
    del block
print(counts[1])
"""


_OWN_ALLOCATOR = any(
    name in os.environ
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds")
@pytest.mark.skipif(_OWN_ALLOCATOR, reason="thresholds pinned, or another allocator preloaded")
def test_freed_block_kept():
    """After an engine's creation, a block of 4 MiB allocated after the free of one of 6 MiB is
    served from pages already mapped (in a fresh process without the probe, glibc gives the 6 MiB
    back to the system, and maps the 4 MiB anew: a fault per page, about 1,000)."""
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    assert int(result.stdout.strip()) < 100


def test_probe_once_per_process(monkeypatch):
    """The probe runs at the first engine's creation only."""
    monkeypatch.setattr(workspace_module, "_heap_raised", False)
    sizes: list[int] = []
    empty = torch.empty

    def spy(*args, **kwargs):
        sizes.append(args[0])
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", spy)
    Engine(torch.nn.Linear(2, 1), batch_dim=0)
    Engine(torch.nn.Linear(2, 1), batch_dim=0)
    assert sizes.count(workspace_module.HEAP_PROBE_BYTES) == 1


def test_probe_on_the_cpu_untouched(monkeypatch):
    """The probe's block is a CPU one under another default device, and is not filled when
    deterministic algorithms are on (the setting is restored)."""
    monkeypatch.setattr(workspace_module, "_heap_raised", False)
    calls: list[tuple[str, bool]] = []
    empty = torch.empty

    def spy(*args, **kwargs):
        fill = torch.utils.deterministic.fill_uninitialized_memory
        calls.append((str(kwargs.get("device")), fill))
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", spy)
    assert torch.utils.deterministic.fill_uninitialized_memory
    with torch.device("meta"):
        workspace_module.raise_heap_thresholds()
    assert calls == [("cpu", False)]
    assert torch.utils.deterministic.fill_uninitialized_memory
