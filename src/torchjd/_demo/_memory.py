"""Peak memory between ``start()`` and ``peak_mib()``, above the memory held at ``start()``.

- on CUDA: the peak of ``torch.cuda.memory_allocated`` (tensors only), reset at the start;
- on CPU under Linux: the peak resident set size of the process (``VmHWM``, reset at the start
  by writing ``5`` to ``/proc/self/clear_refs``) minus the resident size at the start. So that
  freed tensors do not stay cached in the heap (which would hide the next allocations from the
  resident size), glibc is told to serve every allocation of 64 KiB or more by its own ``mmap``,
  returned to the system when freed (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``, for the rest of
  the process: the demo is a command of its own), and the free memory the heap already caches
  is given back at the start (``malloc_trim(0)``), so that a new tensor cannot take resident
  pages that an earlier, freed one left behind. Smaller allocations are still cached:
  differences of a few hundred KiB are noise;
- elsewhere: not measured (``nan``).
"""

import contextlib
import ctypes
import ctypes.util
import math
from pathlib import Path

import torch

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 64 * 1024
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

MEMORY_NOTE = (
    "peak memory: the peak during the steps (evaluations excluded); on CPU, of the resident set "
    "size (Linux VmHWM, reset before each epoch) above its value at the start of the epoch, with "
    "allocations of 64 KiB or more mapped one by one and the heap's free memory given back at "
    "the start, so that freed tensors are not cached; on CUDA, of torch.cuda.memory_allocated "
    "above its value at the start of the epoch"
)


def _map_large_allocations() -> None:
    """Large allocations by ``mmap`` (freed at once), so that the resident size follows them."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tell
        ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def _release_free_heap() -> None:
    """Free pages cached by the heap back to the system, so that reusing them shows in the RSS."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to release
        ctypes.CDLL(name).malloc_trim(0)


def _status_mib(field: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # the value is in kB
    raise KeyError(field)


class PeakMemory:
    """``start()`` then ``peak_mib()``: the growth of memory in between, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._base = math.nan

    def start(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
            self._base = torch.cuda.memory_allocated(self._device) / 2**20
            return
        _map_large_allocations()
        _release_free_heap()
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
            self._base = _status_mib("VmRSS")
        except (OSError, KeyError):
            self._base = math.nan

    def peak_mib(self) -> float:
        if self._device.type == "cuda":
            return torch.cuda.max_memory_allocated(self._device) / 2**20 - self._base
        if math.isnan(self._base):
            return math.nan
        return _status_mib("VmHWM") - self._base
