r"""Embeddings: two positions share a parameter row exactly when they look up the same index.

The gradient of objective :math:`(i, r)` w.r.t. row :math:`v` of the table is
:math:`\sum_{t : x_{it} = v} c_{it}\, \gamma_{irt}` (with :math:`c_{it} = 1`, or the inverse
frequency of :math:`x_{it}` in the call with ``scale_grad_by_freq``; positions at
``padding_idx`` get no gradient), so

.. math::

    G_{ir,js} = \sum_{t,u} [x_{it} = x_{ju}]\, c_{it} c_{ju}\, (\gamma_{irt} \cdot \gamma_{jsu}).

For the fused step, row :math:`v` of the gradient of the weighted objectives is
:math:`\sum_{it : x_{it} = v} c_{it}\, \bar\gamma_{it}` with
:math:`\bar\Gamma_i = \sum_r w_{ir} \Gamma_{ir}` (a sparse table's gradient is left to autograd).
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchjd.autogram._module_call import (
    ModuleCall,
    positions,
    samples_first,
    samples_objectives_first,
)


def embedding_rule(module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
    assert isinstance(module, nn.Embedding)
    index = torch.cat([_per_sample(c.args[0], c.batch_dim) for c in calls], dim=1)
    Gamma = torch.cat(
        [positions(samples_objectives_first(c.grad_output(), c.batch_dim), 2) for c in calls],
        dim=2,
    )  # [B, R, T, d]
    B, R, T, d = Gamma.shape
    scale = torch.cat([_scale(module, c.args[0], c.batch_dim, Gamma.dtype) for c in calls], dim=1)
    flat, scale = index.reshape(-1), scale.reshape(-1)
    same = (flat.unsqueeze(1) == flat.unsqueeze(0)).to(Gamma.dtype)  # [B T, B T]
    K = same * scale.unsqueeze(1) * scale.unsqueeze(0)
    L = Gamma.reshape(B * R * T, d) @ Gamma.reshape(B * R * T, d).T
    G = torch.einsum("itju,irtjsu->irjs", K.reshape(B, T, B, T), L.reshape(B, R, T, B, R, T))
    return G.reshape(B * R, B * R)


def embedding_weighted_gradients(
    module: nn.Module, calls: Sequence[ModuleCall], W: Tensor
) -> list[tuple[Tensor, Tensor]] | None:
    """The gradient of the weighted objectives w.r.t. the table, or None for a sparse one.

    :param W: The weights ``[B, R]`` of the objectives.
    """
    assert isinstance(module, nn.Embedding)
    if module.sparse:
        return None
    grad = torch.zeros_like(module.weight, dtype=W.dtype)
    for call in calls:
        gamma = call.weighted_grad_output(W)
        index = call.args[0]
        scale = _scale(module, index, None, gamma.dtype).reshape(-1, 1)
        grad.index_add_(0, index.reshape(-1), gamma.reshape(-1, module.embedding_dim) * scale)
    return [(module.weight, grad)]


embedding_rule.weighted_gradients = embedding_weighted_gradients  # type: ignore[attr-defined]
embedding_rule.fuses = lambda module, calls: not module.sparse  # type: ignore[attr-defined]
embedding_rule.pure = lambda module, calls: True  # type: ignore[attr-defined]


def _scale(
    module: nn.Embedding, index: Tensor, batch_dim: int | None, dtype: torch.dtype
) -> Tensor:
    """:math:`c_{it}` of one call, ``[B, T]``."""
    scale = torch.ones(index.shape, dtype=dtype, device=index.device)
    if module.padding_idx is not None:
        scale = scale * (index != module.padding_idx)
    if module.scale_grad_by_freq:
        flat = index.reshape(-1)
        counts = (flat.unsqueeze(1) == flat.unsqueeze(0)).sum(dim=1).reshape(index.shape)
        scale = scale / counts
    return _per_sample(scale, batch_dim)


def _per_sample(tensor: Tensor, batch_dim: int | None) -> Tensor:
    """``[B, T]``: the positions of each sample."""
    tensor = samples_first(tensor, batch_dim)
    return tensor.reshape(tensor.shape[0], -1)
