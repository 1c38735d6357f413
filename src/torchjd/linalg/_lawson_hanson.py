r"""The active-set method of Lawson & Hanson (1974, *Solving Least Squares Problems*, ch. 23) for
``min_{v ≥ u} vᵀ G v``, one row at a time: the exact mode's last resort for the rows that its other
routes leave above the tolerance.

With ``x = v − u ≥ 0`` and ``G = J Jᵀ``, the problem is the non-negative least-squares problem
``min_{x ≥ 0} ‖Jᵀ x + Jᵀ u‖²``, written through ``G`` only. The method grows a passive set ``P``
(the free indices) one index at a time, the one of most negative gradient ``(G v)_j``; on ``P``, the
face system ``G_PP x_P = −(G u)_P`` (``x`` zero elsewhere); when its solution leaves ``x ≥ 0``,
the step back to the boundary removes the indices it reaches. In exact arithmetic, the columns of
``Jᵀ`` on ``P`` stay linearly independent (``G_PP`` nonsingular) and the method ends at an optimum
after finitely many steps, whatever the rank of ``G``: unlike the Tikhonov-regularised routes, it
is not biased on a singular ``G`` whose optimal weights are large (near-duplicate rows).

Its steps are sequential (a few host synchronisations each): only for the few rows left. Where
the optimal weights are large (near-duplicate rows), rounding can make a step's step back of zero
remove the index it has just added, back to the state that the step started from: every later step
would then repeat it exactly, and the method stops there with the same weights (on the float64
hard Jacobians of ``benchmarks/non_conflict.py`` at ``m = 64``, seed 5064, 44 of the 383 rows it
got ran all ``3m + 10`` steps that way, about 400 face solves each: a third of the exact mode's
time there; the method now takes 0.18 of its time on the 490 rows of 1,100 such calls at 16 and 64
rows, with the same weights bit for bit).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from torchjd.linalg._kkt import kkt_residual, row_scales

_FREE = 1e-6  # of the largest v_j − u_j of a row: its free indices for the start


def lawson_hanson_rows(G: Tensor, U: Tensor, V: Tensor, max_steps: int) -> Tensor:
    """Rows ``v ≥ u`` of ``min vᵀ G v`` (``G``: symmetric PSD, float64), one per row of ``U``,
    after at most ``max_steps`` additions to the passive set each. Each starts from the free
    indices of its row of ``V`` (an approximate solution, ``v ≥ u``; free: ``v_j − u_j`` above
    :data:`_FREE` of its largest entry, as an interior point's solution is nowhere exactly on
    its bounds), less those where the face solution is not positive; ``V = U``: the method's
    own start, from no free index."""
    if U.shape[0] == 0:
        return U.clone()
    X = V - U
    free = X > _FREE * X.amax(dim=1, keepdim=True)  # noqa: SIM300
    rows = [_lawson_hanson(G, u, f, max_steps) for u, f in zip(U, free, strict=True)]
    return torch.stack(rows)


def _lawson_hanson(G: Tensor, u: Tensor, passive: Tensor, max_steps: int) -> Tensor:
    m = G.shape[0]
    u_scale = u.abs().amax().clamp_min(torch.finfo(G.dtype).tiny)
    # An index enters when its gradient is below this share of its scale (far below any
    # tolerance of the callers; above rounding).
    threshold = -1e-13 * row_scales(G) * u_scale
    Gu = G @ u
    minus_Gu = -Gu  # (the face systems' right-hand sides, gathered)
    x = torch.zeros_like(u)
    # The start: the face solution of the given free indices, less those where it is not
    # positive, until it is (a state of the method: x > 0 exactly on the passive set).
    for _ in range(m):
        (P,) = passive.nonzero(as_tuple=True)
        if P.numel() == 0:
            break
        solution = _face_solve(_block(G, P), minus_Gu.index_select(0, P))
        positive = solution > 0
        if bool(positive.all()):
            x[P] = solution
            break
        passive[P[~positive]] = False
    for _ in range(max_steps):
        gradient = Gu + G @ x
        candidates = torch.where(passive, 0.0, gradient - threshold)
        j = int(candidates.argmin())
        if not bool(candidates[j] < 0):
            break
        # The state that this step starts from (x is never changed in place here).
        start, start_passive, stepped_back = x, passive.clone(), False
        passive[j] = True
        for _ in range(m):  # each inner step frees at least one index
            (P,) = passive.nonzero(as_tuple=True)
            if P.numel() == 0:  # (every index left the passive set at the last step back)
                break
            solution = _face_solve(_block(G, P), minus_Gu.index_select(0, P))
            if not bool(solution.isfinite().all()):
                return u + x
            z = torch.zeros_like(x).index_copy_(0, P, solution)
            if bool((solution > 0).all()):
                x = z
                break
            # Step from x towards z up to the first index of P that reaches zero.
            negative = passive & (z <= 0)
            # (x_j = z_j = 0: the index is at zero already, a step of zero; not 0 / 0)
            ratios = torch.where(
                negative & (x > z), x / (x - z), torch.where(negative, 0.0, torch.inf)
            )
            alpha = ratios.amin().clamp(0, 1)
            x = (x + alpha * (z - x)).clamp_min(0)
            passive &= ~(negative & (ratios <= alpha))
            x = torch.where(passive, x, 0.0)
            stepped_back = True
        if stepped_back and torch.equal(x, start) and torch.equal(passive, start_passive):
            # Back where this step started (a step back of zero removed the index it added, as
            # rounding does where the optimal weights are large): every later step would repeat
            # it exactly (the same gradient, index and face), to the same x.
            break
    return u + x


def _block(G: Tensor, P: Tensor) -> Tensor:
    """``G[P][:, P]``, by two ``index_select`` (a few times cheaper than indexing)."""
    return G.index_select(0, P).index_select(1, P)


def _face_solve(A: Tensor, b: Tensor) -> Tensor:
    """``A⁻¹ b`` by an LU factorisation with partial pivoting (backward stable: a small face
    residual even where ``A`` is ill-conditioned); by least squares where ``A`` is singular (the
    least-norm solution, from an SVD: the CPU's default driver, ``gelsy``, gave wrong and
    irreproducible solutions on singular faces in torch 2.13)."""
    solution, info = torch.linalg.solve_ex(A, b)
    if int(info) != 0:
        if A.device.type == "cpu":
            return torch.linalg.lstsq(A, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        return torch.linalg.pinv(A) @ b  # (CUDA's only driver, gels, needs a full rank)
    return solution


def kkt_best(
    G: Tensor,
    U: Tensor,
    candidates: list[Tensor],
    score: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = kkt_residual,
) -> tuple[Tensor, Tensor]:
    """Of several candidate rows for each row of ``U`` (each raised to ``U``), the one of least
    ``score(G, U, V, V @ G)`` (by default :func:`~torchjd.linalg._kkt.kkt_residual` on ``G``; the
    first candidate on ties; NaN never kept over a number), and its score."""
    best, best_residual = None, None
    for V in candidates:
        V = torch.maximum(V, U)
        residual = score(G, U, V, V @ G).nan_to_num(torch.inf)
        if best is None or best_residual is None:
            best, best_residual = V, residual
            continue
        better = residual < best_residual
        best = torch.where(better.unsqueeze(1), V, best)
        best_residual = torch.where(better, residual, best_residual)
    assert best is not None
    assert best_residual is not None
    return best, best_residual
