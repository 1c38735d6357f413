"""The drops of the dual active-set method of ``_range_projection``: the factors ``ℓ_Aᵀ = Q_1 R``
downdated by Givens rotations are those of a new factorisation of the remaining normals (up to
the signs of their columns), and the method's answers are those it gives when each drop forms the
factors again (cold and warm-started, on degenerate problems, against scipy's NNLS too)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.linalg.test_range_warm_start import nnls_projection, range_problem
from torchjd.linalg import _range_projection
from torchjd.linalg._range_projection import _downdate, _factor, dual_active_set, warm_start


@settings(max_examples=12, deadline=None)
@given(
    r=st.integers(2, 12),
    width=st.integers(2, 10),
    seed=st.integers(0, 2**16),
    log_scale=st.floats(-3, 3),
)
def test_downdate_is_a_new_factorisation(r: int, width: int, seed: int, log_scale: float):
    """Rows with different sizes ``q ≥ 1`` and drop positions (the first, the last, inside), some
    normals nearly dependent: the downdated ``Q_1`` has orthonormal columns (zero beyond
    ``q − 1``), ``R`` is upper-triangular (identity beyond), ``Q_1 R`` is the normals without the
    dropped one, and both equal a new QR factorisation up to signs."""
    g = torch.Generator().manual_seed(seed)
    width = min(width, r)
    k, m = 6, 3 * r
    ell = torch.randn(m, r, generator=g, dtype=torch.float64) * 10**log_scale
    ell[1] = ell[0] + 1e-6 * ell[2]
    padded = torch.cat([ell, torch.zeros_like(ell[:1])])
    q = torch.randint(1, width + 1, (k,), generator=g)
    q[0] = width
    slots = torch.stack([torch.randperm(m, generator=g)[:width] for _ in range(k)])
    slots[0] = torch.cat([torch.tensor([0, 1]), 2 + torch.randperm(m - 2, generator=g)])[:width]
    slots = torch.where(torch.arange(width) < q.unsqueeze(1), slots, m)
    drop = (torch.rand(k, generator=g) * q).long()
    drop[0], drop[1] = 0, q[1] - 1
    Q, R = _factor(padded, slots, q)

    span = (int(drop.min()), int(q.max()) - 2)
    Q_new, R_new = _downdate(Q.clone(), R.clone(), drop, q, span)

    kept = torch.arange(width) != drop.unsqueeze(1)
    remaining = torch.stack([row[keep] for row, keep in zip(slots, kept, strict=True)])
    remaining = torch.cat([remaining, torch.full((k, 1), m)], dim=1)
    Q_ref, R_ref = _factor(padded, remaining, q - 1)
    scale = ell.norm(dim=1).max()
    inside = torch.arange(width) < (q - 1).unsqueeze(1)
    eye = torch.eye(width, dtype=torch.float64)
    assert (Q_new[~inside.unsqueeze(1).expand_as(Q_new)] == 0).all()
    assert (
        R_new[~(inside.unsqueeze(2) & inside.unsqueeze(1))]
        == eye.expand_as(R_new)[~(inside.unsqueeze(2) & inside.unsqueeze(1))]
    ).all()
    assert (R_new.tril(-1) == 0).all()
    gram = Q_new.mT @ Q_new
    expected_gram = torch.where(inside.unsqueeze(2) & inside.unsqueeze(1), eye, 0.0)
    torch.testing.assert_close(gram, expected_gram, rtol=0, atol=1e-9)
    normals = padded[remaining].mT
    torch.testing.assert_close(Q_new @ R_new, normals, rtol=0, atol=1e-12 * scale)
    signs = torch.where(inside, R_new.diagonal(dim1=1, dim2=2).sign(), 1.0)
    signs_ref = torch.where(inside, R_ref.diagonal(dim1=1, dim2=2).sign(), 1.0)
    flip = (signs * signs_ref).unsqueeze(1)
    torch.testing.assert_close(R_new * flip.mT, R_ref, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(Q_new * flip, Q_ref, rtol=0, atol=1e-6)


def refactored(
    Q: torch.Tensor, R: torch.Tensor, drop: torch.Tensor, q: torch.Tensor, span: tuple[int, int]
) -> tuple:
    """The drop as before the downdate: a new QR factorisation of the normals ``Q_1 R`` without the
    dropped one."""
    k, width = drop.shape[0], R.shape[2]
    position = torch.arange(width)
    source = torch.where(position < drop.unsqueeze(1), position, position + 1).clamp_max(width - 1)
    normals = (Q @ R).gather(2, source.unsqueeze(1).expand(k, Q.shape[1], width))
    inside = position < (q - 1).unsqueeze(1)
    Q_new, R_new = torch.linalg.qr(torch.where(inside.unsqueeze(1), normals, 0.0))
    block = inside.unsqueeze(2) & inside.unsqueeze(1)
    eye = torch.eye(width, dtype=R.dtype)
    return torch.where(inside.unsqueeze(1), Q_new, 0.0), torch.where(block, R_new, eye)


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize(("m", "rank", "seed"), [(40, 5, 0), (60, 8, 1), (80, 12, 2), (120, 20, 3)])
def test_same_answers_as_new_factorisations(
    monkeypatch: pytest.MonkeyPatch, m: int, rank: int, seed: int, warm: bool
):
    """The projections, multipliers and finished rows with downdates are those with a new
    factorisation at each drop (to rounding), the projections those of NNLS; drops happen."""
    ell, B = range_problem(m, rank, seed)
    A = B @ ell
    eps = 1e-12 * A.norm(dim=1)
    start = warm_start(ell, B, _range_projection._ADMM_ITERATIONS, 200.0) if warm else None
    drops = []

    def spied(
        Q: torch.Tensor, R: torch.Tensor, drop: torch.Tensor, q: torch.Tensor, span: tuple
    ) -> tuple:
        drops.append(drop.numel())
        return _downdate(Q, R, drop, q, span)

    monkeypatch.setattr(_range_projection, "_ROTATION_COST", 0)  # (always downdated)
    monkeypatch.setattr(_range_projection, "_downdate", spied)
    Y, lam, found = dual_active_set(ell, B, eps, 10 * m, start and tuple(x.clone() for x in start))
    monkeypatch.setattr(_range_projection, "_downdate", refactored)
    Y_ref, lam_ref, found_ref = dual_active_set(
        ell, B, eps, 10 * m, start and tuple(x.clone() for x in start)
    )

    assert warm or sum(drops) > 0
    assert found.all()
    assert (found == found_ref).all()
    scale = A.norm(dim=1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(Y / scale, Y_ref / scale, rtol=0, atol=1e-12)
    torch.testing.assert_close(lam / scale, lam_ref / scale, rtol=0, atol=1e-9)
    for y, a in zip(Y, A, strict=True):
        np.testing.assert_allclose(y.numpy(), nnls_projection(ell, a), atol=1e-8 * a.norm().item())
