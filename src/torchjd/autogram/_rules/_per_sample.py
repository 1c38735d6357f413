r"""Per-sample gradients by re-running a module on each sample with ``torch.func``.

For a module whose inputs hold the samples along known dimensions, ``vmap`` over the samples of
the ``vjp`` of the module's parameters gives the rows :math:`J_{ir}` of every objective in one
vectorised pass (the cost of about one forward and backward of the module), and
:math:`G = J J^\top`. Used by rules whose module layout is known (attention); falls back on the
masked-cotangent rule of ``_generic.py`` when an operation has no batching rule.
"""

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_leaves, tree_map

from torchjd.autogram._module_call import ModuleCall


def per_sample_jacobian(
    module: nn.Module, call: ModuleCall, params: dict[str, Tensor], in_dims: tuple[Any, Any]
) -> Tensor:
    """The rows ``[B R, P]`` of the Jacobian w.r.t. ``params`` (flattened in their order)."""
    selected = [k for k, g in enumerate(call.grad_outputs) if g is not None]
    args, kwargs = tree_map(_detach, (call.args, call.kwargs))
    primals = {name: p.detach() for name, p in params.items()}
    buffers = {name: b.clone() for name, b in module.named_buffers()}

    def rows(sample_args: Any, sample_kwargs: Any, gammas: tuple[Tensor, ...]) -> Tensor:
        if call.batch_dim is not None:  # give back the sample its batch dimension (of size 1)
            sample_args, sample_kwargs = tree_map(
                _unsqueeze, (sample_args, sample_kwargs), in_dims, is_leaf=_is_none
            )
            gammas = tuple(
                g.unsqueeze(call.output_batch_dims[k] + 1)  # type: ignore[operator]
                for g, k in zip(gammas, selected, strict=True)
            )

        def outputs(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            leaves = tree_leaves(
                functional_call(module, {**p, **buffers}, sample_args, sample_kwargs)
            )
            return tuple(leaves[call.output_leaf_indices[k]] for k in selected)

        _, vjp_fn = vjp(outputs, primals)
        grads = vmap(vjp_fn)(gammas)[0]  # one row per objective of the sample
        R = gammas[0].shape[0]
        return torch.cat([grads[name].reshape(R, -1) for name in params], dim=1)

    gammas = tuple(call.grad_outputs[k] for k in selected)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "performance drop" notices
        if call.batch_dim is None:
            return rows(args, kwargs, gammas)  # type: ignore[arg-type]
        gamma_dims = tuple(call.output_batch_dims[k] + 1 for k in selected)  # type: ignore[operator]
        J = vmap(rows, in_dims=(*in_dims, gamma_dims))(args, kwargs, gammas)
    return J.reshape(J.shape[0] * J.shape[1], -1)


def _detach(value: object) -> object:
    return value.detach() if isinstance(value, Tensor) else value


def _unsqueeze(value: object, dim: int | None) -> object:
    return value.unsqueeze(dim) if isinstance(value, Tensor) and dim is not None else value


def _is_none(value: object) -> bool:
    return value is None
