r"""Exact mode beyond ``m = 64``: principal pivoting warm-started by ADMM on a regularised Gramian.

In the least-norm (exact) mode, the solver works on :func:`~torchjd.linalg._bounded_qp.tikhonov`
``(G) = G + σ diag(G)`` with a tiny ``σ``: ADMM converges slowly on it (its condition number is
about ``1/σ`` on the null space of ``G``). The active set of the solution barely depends on the
regularisation, though, so it is first guessed by a few hundred ADMM iterations on the well
conditioned

.. math::

    G_\epsilon = G + \epsilon \operatorname{tr}(G)\, I, \qquad \epsilon = 10^{-4},

(the Gramian of the default mode), to a loose tolerance. Principal pivoting on the Tikhonov
Gramian, with its iterated refinement towards the exact ``G``, then corrects the few indices where
the guess is wrong, in a few exchanges. Rows it does not solve in :data:`_PIVOTS` exchanges are
returned unconverged, for the caller's slower fallback.
"""

import torch
from torch import Tensor

from torchjd.linalg._admm import admm
from torchjd.linalg._kkt import row_scales
from torchjd.linalg._principal_pivoting import principal_pivoting

_REGULARISATION = 1e-4  # ε, relative to the trace: the default mode's
_TOL = 1e-4  # KKT residual at which ADMM's active set is trusted as a guess
_PIVOTS = 10


def warm_started_pivoting(
    G: Tensor, G_exact: Tensor, U: Tensor, tol: float, max_iters: int
) -> tuple[Tensor, Tensor]:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` (``G``: the Tikhonov-regularised ``G_exact``, refined
    towards it), and which rows converged."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    G_regularised = G_exact + _REGULARISATION * G_exact.diagonal().sum() * eye
    Z, _ = admm(G_regularised, U, max(tol, _TOL), max_iters)
    return principal_pivoting(G, U, Z <= U, row_scales(G), tol, _PIVOTS, G_exact)
