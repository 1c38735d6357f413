"""Buffers that an engine keeps from step to step for its rules' largest intermediates.

On the CPU, memory that a step frees is often returned to the system (the C allocator trims its
heap or unmaps its large blocks) and taken back at the next step, a page fault per page on its
first use. A rule that forms a large intermediate of the same shape at every step (the
per-objective gradients of a convolution) asks :func:`empty` for it instead of allocating it:
while an engine's step runs on the CPU, it gets that engine's buffer for the same owner and role,
kept from the previous step, so that those pages stay mapped. Each owner and role has at most one
buffer (replaced when the shape, dtype or device changes), held until the engine is closed or
deleted. Elsewhere (outside a step, or on another device, whose caching allocator already reuses
memory) :func:`empty` allocates as ``new_empty`` does.

A buffer is uninitialised and its contents belong to the current step only: a rule writes every
element before reading it, and nothing that outlives the step may be a view of it.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor


class Workspaces:
    """The buffers of one engine, one per owner (a hooked module) and role (a name)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, str], Tensor] = {}

    def get(self, owner: Any, role: str, shape: Sequence[int], like: Tensor) -> Tensor:
        """The buffer of ``owner`` and ``role``, of ``shape`` and of the dtype and device of
        ``like`` (a new one, replacing the former, when these differ)."""
        key = (owner, role)
        buffer = self._buffers.get(key)
        if (
            buffer is None
            or buffer.shape != tuple(shape)
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            self._buffers.pop(key, None)  # freed before its replacement is allocated
            buffer = self._buffers[key] = like.new_empty(shape)
        return buffer

    def clear(self) -> None:
        """Frees every buffer."""
        self._buffers.clear()

    def __len__(self) -> int:
        return len(self._buffers)

    @contextmanager
    def active(self, fused: bool, keep: bool = True) -> Iterator[None]:
        """Marks the block as a step that is fused (:meth:`~torchjd.autogram.Engine.backward`) or
        not (see :func:`fusing`), and, in a fused one, makes :func:`empty` hand out these buffers
        (on the CPU). With ``keep`` False (a step whose memory the user bounds), it frees them
        and hands out none: what the step allocates is freed with it. A step that is not fused
        (:meth:`~torchjd.autogram.Engine.compute_gramian`) gets none either, and keeps them: a
        buffer held between steps would add to its peak of memory (on cnn64 of
        ``benchmarks/autogram_memory.py``, the 1.75 MiB of the first convolution's patches)."""
        if not keep:
            self.clear()
        token = _ACTIVE.set(self if keep and fused else None)
        fusing_token = _FUSING.set(fused)
        try:
            yield
        finally:
            _FUSING.reset(fusing_token)
            _ACTIVE.reset(token)


_ACTIVE: ContextVar[Workspaces | None] = ContextVar("torchjd_autogram_workspaces", default=None)
_FUSING: ContextVar[bool] = ContextVar("torchjd_autogram_fusing", default=True)


def fusing() -> bool:
    """Whether the step that runs is a fused one, whose rules may keep what its weighted
    gradients need (True outside an engine's step: a rule called directly keeps it)."""
    return _FUSING.get()


def empty(owner: Any, role: str, shape: Sequence[int], like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` with the dtype and device of ``like``: the active
    engine's buffer for ``owner`` and ``role`` when a step runs on the CPU, else a new tensor."""
    workspaces = _ACTIVE.get()
    if workspaces is None or like.device.type != "cpu":
        return like.new_empty(shape)
    return workspaces.get(owner, role, shape, like)


HEAP_PROBE_BYTES = 16 << 20
"""The size of the block that :func:`raise_heap_thresholds` allocates and frees."""

_heap_raised = False


def raise_heap_thresholds() -> None:
    """Once per process: allocates and frees (without touching it) a CPU block of
    :data:`HEAP_PROBE_BYTES`, so that glibc's ``malloc`` keeps the top of its heap.

    glibc serves a block above its mmap threshold (128 KiB at first) with ``mmap``; when such a
    block is freed, it raises that threshold to the block's size (up to 32 MiB) and the threshold
    from which it returns the free top of its heap to the system to twice that. A backward pass
    that keeps the graph (the Gramian's) cannot reuse the activations' memory for autograd's
    transient buffers (those of a ``MultiheadAttention``'s packed projection: 1.5 MiB each with
    32 samples of 32 positions of 128 features): they grow the top of the heap, which is given back
    as soon as the free top exceeds the trim threshold (a few MiB), and taken again at the next
    layer, a page fault per page. With the probe, the thresholds are 16 and 32 MiB: on one CPU
    thread, the Gramian of the Transformer of ``benchmarks/autogram_step.py`` (ERM, IWRM and fused
    steps interleaved) went from 4,700 page faults a step to none and from 31-35 ms to 26 ms. The
    cost: up to 32 MiB of free heap kept by the process. Other allocators only see one allocation
    and one free."""
    global _heap_raised
    if _heap_raised:
        return
    _heap_raised = True
    # freed right away, never touched (not even filled when deterministic algorithms are on), and
    # on the CPU whatever the default device
    deterministic = torch.utils.deterministic
    fill = deterministic.fill_uninitialized_memory
    deterministic.fill_uninitialized_memory = False
    try:
        torch.empty(HEAP_PROBE_BYTES, dtype=torch.uint8, device="cpu")
    finally:
        deterministic.fill_uninitialized_memory = fill
