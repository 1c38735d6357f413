"""The projection onto the simplex by bisection on its threshold: slow, obvious, independent of
the sort-based formula of the library."""

import torch


def project_by_bisection(v: torch.Tensor) -> torch.Tensor:
    """Simplex projection max(v − θ, 0) with Σ = 1, θ found by bisection (independent of the
    sort-based formula)."""
    low, high = float(v.min()) - 1, float(v.max())
    for _ in range(200):
        theta = (low + high) / 2
        if float((v - theta).clamp_min(0).sum()) > 1:
            low = theta
        else:
            high = theta
    return (v - (low + high) / 2).clamp_min(0)
