r"""Exact solution of ``min_{v ≥ u} vᵀ G v`` by block principal pivoting, for many rows at once.

The KKT conditions form a linear complementarity problem: with ``x = v − u ≥ 0`` and
``y = G v ≥ 0``, ``xᵀy = 0``. A guess of the active set ``A`` (where ``x = 0``) fixes ``v``: on the
free set ``F``, ``G_FF v_F = −G_FA u_A``. The guess is right when ``x_F ≥ 0`` and ``y_A ≥ 0``;
otherwise the infeasible indices are exchanged between ``A`` and ``F``, all at once while their
number decreases, else (after three tries) only the largest one: Júdice & Pires (1994), as used
for non-negative least squares by Kim & Park (2011, Algorithm 1). The exchange of all infeasible
indices is the primal-dual active-set step of Hintermüller, Ito & Kunisch (2002). With a positive
definite ``G`` the method stops after finitely many exchanges, at a face whose solution is exact
up to rounding.

Every row has its own face; each step solves all of them together, as one batched Cholesky
factorisation of masked ``[m, m]`` systems (small ``m``), or of the compacted ``|F| × |F|``
blocks grouped by size (large ``m``).
"""

import torch
from torch import Tensor

_FULL_EXCHANGES = 3  # non-improving full exchanges allowed before a single pivot
_MASKED_MAX_M = 32  # up to this size, masked full-size systems beat compacted blocks


def principal_pivoting(
    G: Tensor, U: Tensor, active: Tensor, row_scale: Tensor, threshold: float, max_iters: int
) -> tuple[Tensor, Tensor]:
    """Solves each row from the initial guess ``active`` (``[k, m]`` booleans).

    An index is infeasible when its violation, relative to ``max|u|`` (for ``v ≥ u``) or to
    ``row_scale_j · max|u|`` (for ``(Gv)_j ≥ 0``), exceeds ``threshold``. Returns the last face
    solution of every row, and which rows ended with no infeasible index.
    """
    k, m = U.shape
    X = U.clone()
    converged = torch.zeros(k, dtype=torch.bool, device=U.device)
    rows = torch.arange(k, device=U.device)
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(U.dtype).tiny)
    best = torch.full((k,), m + 1, device=U.device)
    tries = torch.full((k,), _FULL_EXCHANGES, device=U.device)
    positions = torch.arange(m, device=U.device)
    for _ in range(max_iters):
        V = solve_on_faces(G, U, active)
        X[rows] = V
        violation = torch.where(active, -(V @ G) / row_scale, U - V) / u_scale
        infeasible = ~(violation <= threshold)  # NaN (a singular face) counts as infeasible
        count = infeasible.sum(dim=1)
        done = count == 0
        converged[rows] = done
        n_done = int(done.sum())
        if n_done == len(rows):
            break

        improved = count < best
        best = torch.minimum(count, best)
        tries = torch.where(improved, _FULL_EXCHANGES, tries - 1)
        largest = torch.where(infeasible, positions, -1).amax(dim=1, keepdim=True)
        single = (tries < 0).unsqueeze(1)
        active = active ^ torch.where(single, positions == largest, infeasible)
        if 2 * n_done >= len(rows):  # compact when it halves the work
            keep = ~done
            rows, U, active, u_scale, best, tries = (
                t[keep] for t in (rows, U, active, u_scale, best, tries)
            )
    return X, converged


def solve_on_faces(G: Tensor, U: Tensor, active: Tensor) -> Tensor:
    """For each row, ``v_A = u_A`` and ``G_FF v_F = −G_FA u_A`` on its free set ``F = ¬A``."""
    if G.shape[0] <= _MASKED_MAX_M:
        return _solve_masked(G, U, active)
    return _solve_compacted(G, U, active)


def _solve_masked(G: Tensor, U: Tensor, active: Tensor) -> Tensor:
    """One batched ``[k, m, m]`` system: ``G`` on ``F × F``, the identity elsewhere."""
    free = ~active
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    K = torch.where(free.unsqueeze(2) & free.unsqueeze(1), G, eye)
    V_A = torch.where(active, U, 0.0)
    rhs = torch.where(free, -(V_A @ G), V_A)
    L, _ = torch.linalg.cholesky_ex(K)
    return torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2)


def _solve_compacted(G: Tensor, U: Tensor, active: Tensor) -> Tensor:
    """Rows grouped by the size of their free set (up to the next power of two); each group
    solves its compacted ``|F| × |F|`` blocks in one batched Cholesky factorisation."""
    V = torch.where(active, U, 0.0)
    rhs = -(V @ G)
    free = ~active
    sizes = free.sum(dim=1)
    order = torch.argsort(sizes)
    # Each row's free columns first, in increasing order (a stable sort of ``active``).
    columns = torch.argsort(active.to(torch.uint8), dim=1, stable=True)
    sorted_sizes = sizes[order].tolist()
    start = 0
    while start < len(sorted_sizes):
        if sorted_sizes[start] == 0:
            start += 1
            continue
        width = 1 << (sorted_sizes[start] - 1).bit_length()
        stop = start
        while stop < len(sorted_sizes) and sorted_sizes[stop] <= width:
            stop += 1
        width = sorted_sizes[stop - 1]
        group = order[start:stop].unsqueeze(1)
        cols = columns[group.squeeze(1), :width]
        mask = free[group, cols]  # False on the padding
        pad = ~(mask.unsqueeze(2) & mask.unsqueeze(1))
        G_FF = torch.where(pad, 0.0, G[cols.unsqueeze(2), cols.unsqueeze(1)])
        G_FF = G_FF + torch.diag_embed((~mask).to(G.dtype))
        b = torch.where(mask, rhs[group, cols], 0.0)
        L, _ = torch.linalg.cholesky_ex(G_FF)
        x = torch.cholesky_solve(b.unsqueeze(2), L).squeeze(2)
        V[group, cols] = torch.where(mask, x, V[group, cols])
        start = stop
    return V
