"""Optimality measure of ``min_{v ≥ u} vᵀ G v``, shared by the solvers and their tests."""

import torch
from torch import Tensor


def row_scales(G: Tensor) -> Tensor:
    """``s_j = √(G_jj · max_l G_ll)``: with ``G = J Jᵀ``, ``‖J_j‖ · max_l ‖J_l‖``."""
    diagonal = G.diagonal()
    return (diagonal * diagonal.amax()).clamp_min(0).sqrt().clamp_min(torch.finfo(G.dtype).tiny)


def kkt_residual(G: Tensor, U: Tensor, V: Tensor, GV: Tensor, per_weight: bool = False) -> Tensor:
    """Relative KKT residual of each row of ``V`` for ``min vᵀGv s.t. v ≥ u``.

    The largest of: primal infeasibility ``(u_j − v_j)₊ / max|u|``; dual infeasibility
    ``(−(Gv)_j)₊ / (s_j · max|u|)``; complementarity ``|(Gv)_j| · |v_j − u_j| / (s_j · max|u|²)``;
    with ``s`` from :func:`row_scales`. With ``G = J Jᵀ``, ``(Gv)_j = J_j · Jᵀv``: dual
    infeasibility is the conflict of the update with row ``j`` relative to that row's norm, so small
    rows are solved as precisely as large ones. NaN when an input is not finite.

    With ``per_weight``, the complementarity is divided by ``max(1, max|v| / max|u|)``: per unit
    of the row's weights, the scale at which rounding acts (that of ``(G v)_j`` is about
    ``ε Σ_k |G_jk| |v_k|``), to compare candidate rows whose optimal weights are large.
    """
    u_scale, scales = kkt_scales(G, U)
    primal = (U - V).clamp_min(0) / u_scale
    relative_gradient = GV / scales
    dual = (-relative_gradient).clamp_min(0)
    complementarity = relative_gradient.abs() * (V - U).abs() / u_scale
    if per_weight:
        weight_scale = (V.abs().amax(dim=1, keepdim=True) / u_scale).clamp_min(1)
        complementarity = complementarity / weight_scale
    residual = torch.maximum(torch.maximum(primal, dual), complementarity).amax(dim=1)
    not_finite = ~(torch.isfinite(G).all() & torch.isfinite(V).all(dim=1))
    return torch.where(not_finite, torch.nan, residual)


def feasible_kkt_residual(
    G: Tensor, U: Tensor, V: Tensor, GV: Tensor, scales: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """:func:`kkt_residual` of rows known to be feasible (``v ≥ u``) for a finite ``G``: the
    largest of dual infeasibility and complementarity, in fewer operations. NaN rows stay NaN.
    ``scales``: :func:`kkt_scales` ``(G, U)``, when computed once for several calls."""
    u_scale, gradient_scale = kkt_scales(G, U) if scales is None else scales
    relative_gradient = GV / gradient_scale
    complementarity = relative_gradient.abs() * ((V - U) / u_scale)
    return torch.maximum(-relative_gradient, complementarity).amax(dim=1)


def kkt_scales(G: Tensor, U: Tensor) -> tuple[Tensor, Tensor]:
    """The scales of :func:`feasible_kkt_residual`: ``max|u|`` of each row (``[k, 1]``) and that
    of its gradient, ``s_j · max|u|`` (``[k, m]``, ``s`` from :func:`row_scales`)."""
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
    return u_scale, row_scales(G) * u_scale


def worst_conflict(G: Tensor, U: Tensor, GV: Tensor) -> Tensor:
    """The dual infeasibility of :func:`kkt_residual` alone: each row's largest conflict
    ``(−(Gv)_j)₊ / (s_j · max|u|)``, the largest negative inner product of the update ``Jᵀv``
    with a row of ``J``, relative to that row's norm (zero when none is negative)."""
    return (-GV / kkt_scales(G, U)[1]).amax(dim=1).clamp_min(0)
