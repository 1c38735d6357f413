"""Automatic mixed precision: the statistics of the library (Gramians, weights, aggregations) are
computed in the dtype of their inputs, not in the half precision that ``torch.autocast`` would
give their products (float16 overflows beyond 65504, and a Gramian's entries are sums of products
of gradients; a gradient scaler's scale squared reaches that at once)."""

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor


def without_autocast(tensor: object) -> AbstractContextManager[object]:
    """Autocast off on the device of ``tensor`` (a Tensor), where it is on; else nothing."""
    if isinstance(tensor, Tensor) and _autocast_enabled(tensor.device.type):
        return torch.autocast(tensor.device.type, enabled=False)
    return nullcontext()


def _autocast_enabled(kind: str) -> bool:
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None:
        return bool(available(kind) and torch.is_autocast_enabled(kind))
    # (torch < 2.4: no device argument)
    if kind == "cuda":
        return torch.is_autocast_enabled()
    return kind == "cpu" and torch.is_autocast_cpu_enabled()
