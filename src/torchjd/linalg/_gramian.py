"""Gramians and the normalisation that makes the dual-cone problem scale-free."""

import torch
from torch import Tensor

from torchjd.linalg._autograd import tracked


def gramian(matrix: Tensor) -> Tensor:
    """``J Jᵀ`` for a matrix ``J`` of shape ``[m, n]``, made exactly symmetric."""
    G = matrix @ matrix.T
    return symmetrized(G)


def symmetrized(G: Tensor) -> Tensor:
    """``(G + Gᵀ) / 2``: removes the rounding asymmetry of a computed Gramian."""
    return (G + G.T) / 2


def normalized(G: Tensor, norm_eps: float) -> Tensor:
    """``G / tr(G)``, or the zero matrix when ``tr(G) < norm_eps`` (no host synchronisation).

    A NaN trace gives a NaN matrix, so that non-finite inputs propagate.
    """
    trace = G.diagonal().sum()
    # One pass over G: below norm_eps, the divisor is infinite (a division by False), which gives
    # the zero matrix; a NaN trace stays NaN.
    clamped, kept = trace.clamp_min(torch.finfo(G.dtype).tiny), trace >= norm_eps
    if tracked(G):
        # The same values, but the infinite divisor is a constant: the gradient of the division by
        # False (0 / 0) would be NaN where the zero matrix's is zero.
        return G / torch.where(kept, clamped, clamped.detach() / kept)
    return G / (clamped / kept)


def regularized(G: Tensor, reg_eps: float) -> Tensor:
    """``G + reg_eps · I``."""
    if reg_eps == 0.0:
        return G
    out = G.clone()
    out.diagonal().add_(reg_eps)
    return out
