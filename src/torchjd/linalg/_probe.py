"""A probe of a few rows, spread out, before a batch of problems on one Gramian.

Some routes of the exact mode solve the rows of one Gramian at once but succeed on all of them or
on none (near-duplicate rows, large active sets): a few rows go first, and the others only when
enough of those succeed (:func:`probe_first`).
"""

from collections.abc import Callable

import torch
from torch import Tensor

Solver = Callable[[Tensor], tuple[Tensor, Tensor]]
"""Rows ``U ↦ (X, found)``: their solutions (or approximations) and which are found."""


def probe_first(
    U: Tensor, count: int, solve_probe: Solver, solve_others: Solver, enough: int = 1
) -> tuple[Tensor, Tensor]:
    """``solve_probe`` on ``min(k, count)`` of the ``k`` rows ``U``, spread out evenly (the first
    and the last included), then ``solve_others`` on the other rows when it finds at least
    ``enough`` of them (else these stay ``u``, not found)."""
    k = U.shape[0]
    probe = torch.zeros(k, dtype=torch.bool, device=U.device)
    probe[torch.linspace(0, k - 1, min(k, count), device=U.device).long()] = True
    X = U.clone()
    found = torch.zeros_like(probe)
    X[probe], found[probe] = solve_probe(U[probe])
    if int(found.sum()) >= enough and not bool(probe.all()):
        X[~probe], found[~probe] = solve_others(U[~probe])
    return X, found
