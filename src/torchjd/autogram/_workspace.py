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
    def active(self, fused: bool) -> Iterator[None]:
        """Makes :func:`empty` hand out these buffers (on the CPU) within the block, a step that
        is fused (:meth:`~torchjd.autogram.Engine.backward`) or not (see :func:`fusing`)."""
        token = _ACTIVE.set(self)
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
