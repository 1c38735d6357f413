"""The exact line search of ``_range_projection._least_norm``: its step maximises the dual ``q``
along the Newton direction on ``[0, 1]``, against a brute-force grid in float64."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchjd.linalg._range_projection import _line_search


def dual(
    ell: torch.Tensor, B: torch.Tensor, Y: torch.Tensor, tight: torch.Tensor, lam: torch.Tensor
):
    """``q(λ)`` of each row, written out: ``Σ_{j ∈ T} (½ z_j − c_j) z_j − Σ_{j ∉ T} c_j b_j +
    λ · y``, ``c = ℓ λ``, ``z_j = max(b_j, c_j)`` (``λ``: ``[..., k, r]``)."""
    c = lam @ ell.T
    z = torch.maximum(B, c)
    on_tight = ((0.5 * z - c) * z * tight).sum(dim=-1)
    off_tight = (c * B * ~tight).sum(dim=-1)
    return on_tight - off_tight + (lam * Y).sum(dim=-1)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 24),
    r=st.integers(1, 6),
    k=st.integers(1, 4),
    scale=st.floats(-1.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_step_maximises_the_dual_on_the_segment(m: int, r: int, k: int, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    ell = randn(m, r)
    ell = ell / ell.norm(dim=1, keepdim=True)
    lam, Y = randn(k, r), randn(k, r)
    C = lam @ ell.T
    # Bounds on both sides of ℓλ, some exactly on it (a breakpoint at 0).
    B = torch.where(torch.rand(k, m, generator=g) < 0.2, C, C + randn(k, m))
    tight = torch.rand(k, m, generator=g) < 0.7
    Z = torch.where(tight, torch.maximum(B, C), B)
    gradient = Y - Z @ ell
    direction = randn(k, r) * 10**scale
    slope = (gradient * direction).sum(dim=1, keepdim=True)
    direction = torch.where(slope < 0, -direction, direction)  # an ascent direction

    new = _line_search(ell, B, tight, lam, C, (gradient * direction).sum(dim=1), direction)
    alpha = ((new - lam) * direction).sum(dim=1) / (direction * direction).sum(dim=1)
    assert torch.allclose(new, lam + alpha.unsqueeze(1) * direction, rtol=1e-12, atol=1e-12)
    assert bool(((alpha >= -1e-12) & (alpha <= 1 + 1e-12)).all())

    grid = torch.linspace(0, 1, 4001, dtype=torch.float64).unsqueeze(1).expand(-1, k)
    near = torch.stack([alpha - 1e-7, alpha + 1e-7])  # the step is a maximum, not only on the grid
    grid = torch.cat([grid, near]).clamp(0, 1)  # [points, k]
    trials = lam + grid.unsqueeze(2) * direction
    values = dual(ell, B, Y, tight, trials)  # [points, k]
    best = dual(ell, B, Y, tight, new)
    tolerance = 1e-10 * (1 + values.abs().amax(dim=0))
    assert bool((best >= values.amax(dim=0) - tolerance).all())
