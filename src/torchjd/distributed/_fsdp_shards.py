r"""FSDP2's parameters as ``fsdp_jac_to_grad`` sees them: each sharded DTensor with the plain
parameter that FSDP2 all-gathers it into for the passes (where autojac leaves its ``.jac``), and
the layout of a rank's shard columns: ``chunk`` rows along the sharded dimension, the last ranks'
padded (as FSDP2 pads them)."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


@dataclass
class ShardedParam:
    """One parameter under FSDP2: its sharded DTensor (registered in the module between the
    passes) and the plain parameter that it is all-gathered into, where autojac writes."""

    name: str
    param: "DTensor"  # placements (Shard(dim),) or (Replicate(), Shard(dim)) once checked
    unsharded: Tensor | None

    @property
    def dim(self) -> int:
        return self.param.placements[-1].dim

    @property
    def chunk(self) -> int:
        """The rows along ``dim`` of every rank's shard (the last ones: fewer, padded)."""
        mesh = self.param.device_mesh  # (replicas, then) the ranks that shard
        return -(-self.param.shape[self.dim] // mesh.size(mesh.ndim - 1))

    def columns(self) -> int:
        """The padded number of entries of a rank's shard."""
        return self.chunk * self.param.numel() // max(self.param.shape[self.dim], 1)


def shards_of(module: nn.Module) -> list[ShardedParam]:
    """Every parameter of the ``fully_shard`` calls in ``module`` (in the order of its modules:
    the same on every rank)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module. Found {type(module).__name__}.")
    names = {id(p): name for name, p in module.named_parameters()}
    shards = []
    for sub in module.modules():
        if not isinstance(sub, FSDPModule):
            continue
        for fsdp_param in _fsdp_params(sub):
            param = fsdp_param.sharded_param
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            name = names.get(id(param)) or names.get(id(unsharded)) or type(sub).__name__
            shards.append(ShardedParam(name, param, unsharded))
    if not shards:
        raise TypeError(
            "`module` must be sharded by torch.distributed.fsdp.fully_shard (no parameter of "
            f"{type(module).__name__} is). Under DistributedDataParallel, use "
            "torchjd.distributed.jac_to_grad."
        )
    return shards


def check_placements(shards: list[ShardedParam]) -> None:
    """FSDP (one ``Shard(dim)`` over a 1-D mesh) or HSDP (``Replicate(), Shard(dim)`` over a 2-D
    mesh: the shards replicated between groups of ranks)."""
    from torch.distributed.tensor import Replicate, Shard

    for shard in shards:
        mesh, placements = shard.param.device_mesh, tuple(shard.param.placements)
        kinds = tuple(type(placement) for placement in placements)
        if kinds not in ((Shard,), (Replicate, Shard)):
            raise ValueError(
                "Only FSDP's sharding (Shard(dim) over a 1-D mesh) and HSDP's (Replicate(), "
                f"Shard(dim) over a 2-D mesh) are supported. Found `{shard.name}` with placements "
                f"{placements} on a {mesh.ndim}-D mesh. Replicate the parameters "
                "(DistributedDataParallel) and use torchjd.distributed.jac_to_grad instead."
            )


def check_all_sharded(module: nn.Module, shards: list[ShardedParam]) -> None:
    # (between the passes, FSDP registers the sharded parameters; unsharded ones if kept so)
    sharded = {id(s.param) for s in shards} | {id(s.unsharded) for s in shards}
    plain = [n for n, p in module.named_parameters() if id(p) not in sharded and hasattr(p, "jac")]
    if plain:
        raise ValueError(
            f"Every parameter with a `.jac` must be sharded by fully_shard. Found {plain} outside "
            "of it: apply fully_shard to the model itself too (it takes the parameters that its "
            "submodules' fully_shard did not)."
        )


def _fsdp_params(module: nn.Module) -> list:
    """FSDP2's records of the parameters of one ``fully_shard``: the sharded and the unsharded
    parameter of each (private attributes of torch's FSDP2, which has no public way to reach the
    unsharded parameters that autograd sees)."""
    try:
        param_group = module._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
        return [] if param_group is None else list(param_group.fsdp_params)
    except AttributeError as error:
        raise RuntimeError(
            "The FSDP2 of this version of torch does not expose its parameters as expected "
            f"(`_get_fsdp_state()._fsdp_param_group.fsdp_params`): {error}."
        ) from error


def group_of(
    shards: list[ShardedParam],
) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """The ranks that shard the parameters (the last dimension of the mesh), and those between
    which the shards are replicated (HSDP), or None (FSDP)."""
    meshes = [s.param.device_mesh for s in shards]
    layouts = [mesh.mesh.tolist() for mesh in meshes]
    for shard, layout in zip(shards, layouts, strict=True):
        if layout != layouts[0]:
            raise ValueError(
                "Every parameter must be sharded over the same mesh of ranks. Found "
                f"{layouts[0]} for `{shards[0].name}` and {layout} for `{shard.name}`."
            )
    mesh = meshes[0]
    if mesh.ndim == 1:
        return mesh.get_group(), None
    return mesh.get_group(1), mesh.get_group(0)


def jac_of(shard: ShardedParam) -> Tensor | None:
    return None if shard.unsharded is None else getattr(shard.unsharded, "jac", None)


def grad_of(shard: ShardedParam) -> Tensor | None:
    return None if shard.unsharded is None else shard.unsharded.grad


def by_destination(
    shards: list[ShardedParam],
    take: Callable[[ShardedParam], Tensor | None],
    k: int,
    R: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    r"""``[R, k, B]``: at ``[s]``, the columns of rank :math:`s`'s shards of this rank's ``k``
    rows (``take(shard)``, ``[k, *shape]``, zeros where it is None), padded to ``chunk`` rows
    along the sharded dimension, shard after shard. ``take`` removes each from its parameter, so
    that it is freed as soon as it is copied."""
    B = sum(shard.columns() for shard in shards)
    send = torch.zeros((R, k, B), dtype=dtype, device=device)
    start = 0
    for shard in shards:
        value, b, c = take(shard), shard.columns(), shard.chunk
        if value is not None and b > 0:
            rows = value.reshape(k, *shard.param.shape).movedim(shard.dim + 1, 1)
            del value
            rows = rows.reshape(k, rows.shape[1], -1)  # [k, S_d, rest]: a view when dim is 0
            target = send[:, :, start : start + b].unflatten(2, (c, -1)).transpose(0, 1)
            full, rest = divmod(rows.shape[1], c)  # whole chunks, then a last partial one
            target[:, :full].copy_(rows[:, : full * c].unflatten(1, (full, c)))
            if rest:
                target[:, full, :rest].copy_(rows[:, full * c :])
        start += b
    return send


def clear(shards: list[ShardedParam]) -> None:
    """Removes what autojac left on the unsharded parameters."""
    for shard in shards:
        if shard.unsharded is not None:
            shard.unsharded.__dict__.pop("jac", None)
            shard.unsharded.grad = None


def take_jac(shard: ShardedParam) -> Tensor | None:
    return None if shard.unsharded is None else shard.unsharded.__dict__.pop("jac", None)


def take_grad(shard: ShardedParam) -> Tensor | None:
    grad = grad_of(shard)
    if grad is not None:
        shard.unsharded.grad = None  # type: ignore[union-attr]
    return grad


def accumulate(shards: list[ShardedParam], flat: Tensor) -> None:
    """Adds to each shard's ``.grad`` its part of ``flat`` (``[B]``, the columns of this rank's
    shards as laid out by ``by_destination``), without the padding."""
    from torch.distributed.tensor import DTensor

    for shard, part in zip(shards, _split(flat, shards), strict=True):
        param = shard.param
        local_shape = param.to_local().shape
        moved = (local_shape[shard.dim], *_without(param.shape, shard.dim))
        block = part.view(shard.chunk, *moved[1:])[: moved[0]].movedim(0, shard.dim)
        local = block.to(dtype=param.dtype, device=param.to_local().device)
        grad = DTensor.from_local(
            local.contiguous(),
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )
        param.grad = grad if param.grad is None else param.grad + grad


def _split(flat: Tensor, shards: list[ShardedParam]) -> Iterator[Tensor]:
    return iter(torch.split(flat, [s.columns() for s in shards]))


def _without(shape: torch.Size, dim: int) -> tuple[int, ...]:
    return (*shape[:dim], *shape[dim + 1 :])
