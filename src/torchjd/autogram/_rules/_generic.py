r"""The fallback rule, exact for any module: per-objective gradients formed explicitly.

The module's forward is re-run on its recorded (detached) inputs, with the random state of the
original call and copies of its buffers, so that the parameters' local Jacobian is the one of the
original call. Backpropagating the cotangent of objective :math:`(i, r)` (the output gradient of
objective :math:`r`, restricted to sample :math:`i`) gives the row :math:`J_{ir}`, and
:math:`G = J J^\top` with :math:`J` summed over the calls.
"""

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call
from torch.utils._pytree import tree_leaves, tree_map

from torchjd.autogram._batched_grad import batched_grad
from torchjd.autogram._module_call import ModuleCall, masked_cotangents


def generic_rule(module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
    """The Gramian w.r.t. the direct trainable parameters of ``module``."""
    params = [p for p in module.parameters(recurse=False) if p.requires_grad]
    return gramian_by_recomputation(module, calls, params)


def generic_subtree_rule(module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
    """The Gramian w.r.t. all trainable parameters of ``module`` and of its children."""
    params = [p for p in module.parameters() if p.requires_grad]
    return gramian_by_recomputation(module, calls, params)


def gramian_by_recomputation(
    module: nn.Module, calls: Sequence[ModuleCall], params: list[Tensor]
) -> Tensor:
    J = rows_by_recomputation(module, calls, params)
    return J @ J.T


def rows_by_recomputation(
    module: nn.Module, calls: Sequence[ModuleCall], params: list[Tensor]
) -> Tensor:
    """The rows ``[B R, P]`` of the Jacobian w.r.t. ``params`` (flattened in their order), of
    objective ``(i, r)`` at row ``i R + r``, summed over the calls.

    Refuses parameters sharded between processes (DTensor, e.g. by FSDP's ``fully_shard``): the
    re-run would see only this process's shard."""
    refuse_sharded(module, params)
    J: Tensor | None = None
    for call in calls:
        outputs = _recompute(module, call)
        selected, cotangents = [], []
        num, dtype = 0, params[0].dtype
        for k, index in enumerate(call.output_leaf_indices):
            if call.grad_outputs[k] is None:
                continue
            cotangent = masked_cotangents(
                call.grad_outputs[k], call.output_batch_dims[k], call.num_samples
            )
            num, dtype = cotangent.shape[0], cotangent.dtype
            if outputs[index].requires_grad:  # not an input returned as it is (no parameter)
                selected.append(outputs[index])
                cotangents.append(cotangent)
        if len(selected) > 1:
            cotangents = _external(selected, cotangents)
        grads = batched_grad(selected, params, cotangents) if selected else [None] * len(params)
        rows = torch.cat(
            [
                torch.zeros(num, p.numel(), dtype=dtype, device=p.device)
                if g is None
                else g.reshape(num, -1)
                for g, p in zip(grads, params, strict=True)
            ],
            dim=1,
        )
        J = rows if J is None else J + rows
    assert J is not None
    return J


def _external(outputs: list[Tensor], cotangents: list[Tensor]) -> list[Tensor]:
    r"""The cotangents of a call's ``outputs`` from outside the call, from the recorded ones.

    The recorded ones are the gradients at the outputs; when an output is computed from another
    (``(o, o[:, :2])``, logits and their softmax), the gradient at that other one also holds what
    flows back through the first, a path that the re-run's graph holds too: backpropagating the
    recorded ones would count it twice. With :math:`D_{jk}` the Jacobian of output :math:`j`
    w.r.t. output :math:`k` (the identity for :math:`j = k`), the recorded ones are
    :math:`g_k = \sum_j D_{jk}^\top c_j`, solved for :math:`c` by substitution: one backward
    pass per link of the longest chain of outputs computed from one another, found in the
    re-run's graph (none when no output depends on another; no value is read on the host)."""
    external = cotangents
    for _ in range(_longest_chain(outputs)):
        # Σ_j D_jkᵀ c_j for each k (c_k itself included: an output reaches itself)
        through = batched_grad(outputs, outputs, external)
        external = [g - t + c for g, t, c in zip(cotangents, through, external, strict=True)]  # type: ignore[operator]
    return external


def _longest_chain(outputs: list[Tensor]) -> int:
    """The number of links of the longest chain ``o_a <- o_b <- ...`` of ``outputs`` each computed
    from the next (0 when none is computed from another), from their graph."""
    nodes = [o.grad_fn if o.grad_fn is not None else get_gradient_edge(o).node for o in outputs]
    index = {node: k for k, node in enumerate(nodes)}
    below: list[set[int]] = []  # the outputs that each one is computed from
    for node in nodes:
        found: set[int] = set()
        seen: set[object] = set()
        stack = [n for n, _ in node.next_functions if n is not None]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in index:
                found.add(index[current])
            stack.extend(n for n, _ in current.next_functions if n is not None)
        below.append(found)
    depth: dict[int, int] = {}

    def chain(k: int) -> int:
        if k not in depth:
            depth[k] = max((1 + chain(j) for j in below[k]), default=0)
        return depth[k]

    return max(chain(k) for k in range(len(outputs)))


def refuse_sharded(module: nn.Module, params: Iterable[Tensor]) -> None:
    """Raises when some of ``params`` (those that a rule of ``module`` re-runs it with) are
    sharded between processes (DTensor, e.g. by FSDP's ``fully_shard``): a re-run would see only
    this process's shard. Every rule that re-runs its module calls it first."""
    if any(map(_is_sharded, params)):
        raise ValueError(
            f"The autogram rule of {type(module).__name__} re-runs the module with its parameters, "
            f"but those of {type(module).__name__} are sharded (DTensor, e.g. by FSDP's "
            "fully_shard), so the re-run would see only this process's shard. Keep the module out "
            "of fully_shard, or use DDP."
        )


def _recompute(module: nn.Module, call: ModuleCall) -> list[Tensor]:
    args, kwargs = tree_map(_detach, (call.args, call.kwargs))
    buffers = {name: b.clone() for name, b in module.named_buffers()}  # running stats untouched
    with torch.random.fork_rng(devices=_devices(call)), torch.enable_grad():
        _set_rng_state(call)
        output = functional_call(module, buffers, args, kwargs)
    return tree_leaves(output)


def _is_sharded(param: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed, or before 2.5: no DTensor, no FSDP2
        return False
    return isinstance(param, DTensor)


def _detach(value: object) -> object:
    return value.detach() if isinstance(value, Tensor) else value


def _devices(call: ModuleCall) -> list[torch.device]:
    return [] if call.rng_state is None else list(call.rng_state[1])


def _set_rng_state(call: ModuleCall) -> None:
    if call.rng_state is None:
        return
    cpu_state, device_states = call.rng_state
    torch.random.set_rng_state(cpu_state)
    for device, state in device_states.items():
        torch.cuda.set_rng_state(state, device)


generic_rule.recomputes_forward = True  # type: ignore[attr-defined]  (the engine saves RNG states)
generic_subtree_rule.recomputes_forward = True  # type: ignore[attr-defined]
