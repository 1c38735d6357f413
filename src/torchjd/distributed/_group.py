"""The process group and the exchange of shapes that every collective of this package starts with,
so that a rank whose arguments are wrong makes every rank raise instead of hanging."""

import torch
import torch.distributed as dist
from torch import Tensor

# the dtypes that the ranks exchange as their index in this list, to check that they agree
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def dtype_code(dtype: torch.dtype) -> int:
    """The index of ``dtype`` in :data:`FLOAT_DTYPES`, or its length for any other dtype."""
    return FLOAT_DTYPES.index(dtype) if dtype in FLOAT_DTYPES else len(FLOAT_DTYPES)


def agreed_dtype(codes: list[int], requirement: str) -> torch.dtype:
    """The floating dtype of the ranks' :func:`dtype_code` ``codes`` (those of the ranks that hold
    some data) when they agree; else a ValueError stating ``requirement`` and the dtypes found."""
    if len(set(codes)) > 1 or codes[0] >= len(FLOAT_DTYPES):
        names = [str(FLOAT_DTYPES[c]) if 0 <= c < len(FLOAT_DTYPES) else "other" for c in codes]
        raise ValueError(f"{requirement} Found, by rank holding some: {names}.")
    return FLOAT_DTYPES[codes[0]]


def resolve_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torchjd.distributed needs an initialized default process group. Call "
            "`torch.distributed.init_process_group(...)` first (torchrun sets its arguments)."
        )
    if process_group is None:
        return dist.group.WORLD  # type: ignore[return-value]
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "`process_group` must be a torch.distributed.ProcessGroup or None (the default group). "
            f"Found {type(process_group).__name__}."
        )
    return process_group


def collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where the backend of ``group`` takes tensors when no data says where: NCCL exchanges only
    CUDA tensors (the current device); the others (gloo, MPI) take CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_shapes(
    local: tuple[int, ...] | None, group: dist.ProcessGroup
) -> list[tuple[int, ...]] | None:
    """Every rank's ``local`` tuple (all of the same length), or None on every rank when some rank
    passed None (its arguments failed their checks)."""
    size = 4
    # on the backend's device whatever the device of the data, so that a rank whose tensors are
    # wrong still knows where to put these
    row = torch.zeros(size + 1, dtype=torch.int64, device=collective_device(group))
    if local is not None:
        row[0] = 1
        row[1 : 1 + len(local)] = torch.tensor(local, dtype=torch.int64)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    table = torch.stack(rows).tolist()  # a few integers: the only host synchronisation
    if not all(r[0] == 1 for r in table):
        return None
    n = 0 if local is None else len(local)
    return [tuple(r[1 : 1 + n]) for r in table]


def failed_ranks_error(group: dist.ProcessGroup) -> RuntimeError:
    return RuntimeError(
        f"Another rank of the process group (size {dist.get_world_size(group)}) failed the checks "
        "of its arguments; see its error. Every rank must pass valid arguments."
    )


def all_gather_rows(matrix: Tensor, counts: list[int], group: dist.ProcessGroup) -> Tensor:
    """The ranks' matrices ``[counts[r], ...]`` stacked in rank order (each padded to the largest
    count for the collective, which needs equal shapes, into one buffer: no copy to concatenate
    when the counts are equal). On one rank, ``matrix`` itself."""
    if len(counts) == 1:
        return matrix
    largest = max(counts)
    padded = matrix
    if matrix.shape[0] < largest:
        padding = matrix.new_zeros((largest - matrix.shape[0], *matrix.shape[1:]))
        padded = torch.cat([matrix, padding])
    gathered = matrix.new_empty((len(counts) * largest, *matrix.shape[1:]))
    # all_gather_into_tensor is deprecated for all_gather_single where torch has it
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_into(gathered, padded.contiguous(), group=group)
    if all(count == largest for count in counts):
        return gathered
    blocks = gathered.view(len(counts), largest, *matrix.shape[1:])
    return torch.cat([block[:count] for block, count in zip(blocks, counts, strict=True)])
