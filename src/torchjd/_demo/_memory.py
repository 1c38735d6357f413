"""Peak memory of a training run, above the memory held when it started.

- on CUDA: the peak of ``torch.cuda.memory_allocated`` (tensors only), reset at the start;
- on CPU under Linux: the peak resident set size of the process (``VmHWM``, reset at the start
  by writing ``5`` to ``/proc/self/clear_refs``) minus the resident size at the start. It counts
  everything the process touches (allocator caches included), so it is coarse: differences of
  less than a MiB or two are noise;
- elsewhere: not measured (``nan``).
"""

import math
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

MEMORY_NOTE = (
    "peak memory: on CPU, the peak resident set size (Linux VmHWM, reset before each run) above "
    "the resident size at the start of the run; on CUDA, the peak of torch.cuda.memory_allocated "
    "above its value at the start"
)


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
