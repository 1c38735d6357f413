r"""Projection onto the dual cone of the rows of a matrix, in its dual (weight-space) form."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd.linalg._autograd import tracked
from torchjd.linalg._bounded_qp import (
    _DIRECT_MAX_M,
    DEFAULT_TOL,
    LEAST_NORM_TOL,
    _exact_unit_route,
    _large_unit_route,
    _small_unit_route,
    _solve,
    solve_lower_bounded_qp,
)
from torchjd.linalg._gramian import normalized, regularized, symmetrized
from torchjd.linalg._matrix import PSDMatrix


def _non_negative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a float. Found {value!r} of type {type(value).__name__}."
        )
    if not value >= 0.0:  # also refuses NaN
        raise ValueError(f"`{name}` must be non-negative. Found {name}={value!r}.")
    return float(value)


class DualConeProjector(ABC):
    r"""Projects weighted combinations of the rows of ``J`` onto the dual cone of these rows.

    The dual cone of the rows of ``J`` is :math:`\{d : J d \ge 0\}`: the directions that conflict
    with no row. Projecting :math:`J^\top u` onto it gives :math:`J^\top v`, where

    .. math::

        v = \operatorname*{argmin}_{v \ge u} \; v^\top G v, \qquad G = J J^\top

    (Quinton & Rey, 2024, Proposition 1). A projector works in this weight space: it receives the
    weight vectors ``U`` (shape ``[m]`` or ``[k, m]``, one problem per row) and the Gramian ``G``
    (shape ``[m, m]``), and returns the weights ``V``, of the shape of ``U``.

    Subclass it and implement :meth:`__call__` to plug another solver into
    :class:`~torchjd.aggregation.UPGrad` or :class:`~torchjd.aggregation.DualProj`.
    """

    @abstractmethod
    def __call__(self, U: Tensor, G: PSDMatrix) -> Tensor:
        """Rows ``argmin_{v ≥ u} vᵀ G v`` for each row ``u`` of ``U``."""


class TorchProjector(DualConeProjector):
    r"""The default projector: a batched solver written in torch, on ``G``'s device and dtype.

    **Defaults** (those of the paper and of the published library): the Gramian is divided by its
    trace, or replaced by zero when the trace is below ``norm_eps``, and ``reg_eps`` times the
    identity is added to it. The problem is then strongly convex and cheap, but its solution only
    approximately avoids conflict: on the regularised problem, :math:`(G w)_i \ge -\epsilon\,
    \operatorname{tr}(G)\, w_i`, so the update can conflict with rows whose gradient is small
    against the others; and below ``norm_eps`` the projection is switched off altogether (UPGrad
    becomes the mean). On 2,000 hard random Jacobians of 16 and 64 rows (rank-deficient, zero,
    near-duplicate and opposite rows, more rows than columns, row norms over six orders of
    magnitude; ``benchmarks/non_conflict.py``), UPGrad's update with the defaults conflicts with
    some row (:math:`J_i \cdot d < -\tau\, \|J_i\| \max_j \|J_j\|`, :math:`\tau = 10^{-6}` in
    float64, :math:`10^{-3}` in float32) on 1,222 of them (61%), by up to :math:`0.49\,
    \|J_i\| \max_j \|J_j\|`; in the exact mode, on none.

    **Exact mode**: ``TorchProjector(norm_eps=0.0, reg_eps=0.0)`` solves the unregularised problem
    on any positive semi-definite Gramian, singular ones included (more rows than columns,
    duplicate, zero and opposite rows). Its update never conflicts: :math:`J_i \cdot d \ge -10^{-8}
    \|J_i\| \max_j \|J_j\|` in float64 (:math:`10^{-4}` in float32), whatever the scale of ``J``; a
    zero Jacobian gives a zero update. In float64, every row meets the KKT tolerance ``1e-9``
    (relative) where rounding allows it; where it does not (near-duplicate rows whose optimal
    weights reach ``1e6``), the row of least KKT residual found is returned (rows left above the
    tolerance by the other routes are finished by a Lawson-Hanson active-set method on ``G``
    itself). The update :math:`J^\top v` is unique, but the weights are
    not when ``G`` is singular. Among the optimal weights, the projector returns those that
    minimise :math:`\sum_j \|v_j J_j\|^2 = \sum_j G_{jj} v_j^2`: the least-norm weights when the
    rows have equal norms (per-sample gradients often nearly do), and otherwise the least-norm
    weights of the rows normalised to unit norm, so that a row's weight is not inflated because its
    gradient is small (zero rows get :math:`v_j = \max(u_j, 0)`). Logged weights are then well
    defined, to the solver's tolerance: on the hard Jacobians of ``benchmarks/non_conflict.py`` at
    64 rows, against an independent solution (quadprog, update fixed), the degenerate rows that
    reach its interior-point fallback (about one in ten) have :math:`\sum_j G_{jj} v_j^2` within
    ``1e-3`` (relative) of the least on all but 1 of 675 in float64 (at worst 0.3% above) and 8 of
    635 in float32 (at worst 1.1% above). Up to 64 rows in float64, every row's weights are then
    brought to the least-energy ones of its update (a Newton method in the range of ``G``): among
    the singular Gramians of 100 hard Jacobians at 8, 16, 32 and 64 rows (about 90 each), those with
    a unit row whose optimality conditions for the least energy (checked by a linear program,
    relative to the row's largest term) miss ``1e-6`` went from 6, 19, 26 and 12 (up to 0.28, 1.0,
    0.98 and 0.23) to 1, 2, 1 and 7 (up to 0.007, 0.01, 4e-5 and 0.21; at 64 rows, rows near a
    positive span, or whose KKT residual misses the tolerance). Float32 weights are not polished:
    the rounding of a float32 Gramian blurs its rank, and, read at a rank threshold of ``1e-3`` of
    the largest singular value of ``J``, 37 to 56 of about 90 singular Gramians from 8 to 64 rows
    have a row off by more than ``1e-3``. On degenerate rows the least energy is only defined up to
    the KKT tolerance: updates that differ within it can have weights whose energies differ by a
    factor of 20 (seen on 2 of 2,144 float64 calls from 8 to 64 rows), and which one is returned can
    then depend on rounding (the order of a kernel's sums).
    Its cost depends on the Gramian. A nonsingular one (every squared pivot of the Cholesky
    factor of the Jacobi-scaled Gramian at least ``1e-6`` in float64, ``1e-3`` in float32: fewer
    rows than columns, no near-duplicate or zero rows) has unique optimal weights, and is solved by
    the default's own method on the unregularised Gramian, each row then checked on it: median
    ratio of the times to the default's 1.0x to 1.5x from 16 to 1,024 rows
    (``benchmarks/exact_mode_routes.py``, one thread; at 1,024 rows, 1.7x in float64 and 1.1x in
    float32), up to 3.6x (float64) and 7x (float32) at 256 and 1,024 rows when the row norms
    spread over six decades (which the default's regularisation hides). A singular or nearly
    singular one costs more: median ratio 1.5x to 1.8x in float32 at 16 and 64 rows, 2.2x and
    1.8x in float64, whose least-energy polish (above) costs about 0.3 ms and 1.2 ms a call
    (less where every row's optimal weights are unique: it then checks them and stops; up to 32
    rows, none where the rows positively span a subspace, a third of the singular Gramians at 16
    rows, solved in the range of ``G`` by an active-set method that gives the least-energy
    weights at once) (``benchmarks/non_conflict.py``, 100 hard Jacobians per dtype and size, one
    thread; in total time 1.8x (float32) and 2.6x (float64) at 16 rows, and 2.7x and 3.2x at 64
    rows, as about a
    third of the singular Gramians at 64 rows send some rows to a slower interior-point method,
    whose weights are then brought to the least-norm ones); when many more rows
    than the rank positively span a subspace (low-rank Gramians), 0.9x (float64) to 1.2x
    (float32) at 256 rows and 2.7x to 3.5x at 1,024 rows; otherwise, at 128 rows, 2.4x (float64)
    to 4.1x (float32) the default's total time on 40 hard Jacobians of
    ``benchmarks/non_conflict.py`` (mostly singular), and at 256 rows 3.2x and 5.6x (median per
    matrix 1.6x and 1.7x), where the default is fast (15-35 ms a call on average) and the exact
    mode takes up to about 0.6 s; at 512 rows, 17x and 31x on 8 of them (seconds a call); at
    1,024 rows, seconds to minutes a call when there are many more rows than columns (see
    below), except when the only singular part of ``G`` is zero rows and pairs of opposite rows
    (about 2 s a call: see **Method**).

    **Method**: all ``k`` problems share the factorisation of ``G``. Up to ``m = 64`` they are
    solved exactly, all at once, in float64: by trying every active set up to ``m = 8``, then by
    single principal pivots (``m ≤ 24``) or block principal pivoting; beyond, by pivoting too
    when each row's faces are cheap through ``G⁻¹`` (few conflicts per row, or few distinct
    faces, as in per-sample Gramians at initialisation, whose rows share the face of their
    class), and otherwise by ADMM followed by an exact active-set polish when its cost is small
    (see ``torchjd/linalg/_bounded_qp.py``). In the exact mode, beyond ``m = 64``, pivoting
    starts from the active set that ADMM finds with a small regularisation (``10⁻⁴ diag(G)``,
    Jacobi-scaled, in float32; from ``m = 512``, :math:`10^{-6} \operatorname{tr}(G)`, in
    float32); below ``m = 512``, the rows it leaves are pivoted again in float64 from their last
    faces (on ``G`` itself for a float64 ``G``); those still left (degenerate problems) go to a
    float64 interior-point method, whose Newton systems use the Woodbury identity when
    ``rank(G) ≤ 2m / 3``. Before that, when the only singular part of ``G`` is zero rows and pairs
    of opposite rows (``J_a = −c J_b``, whose weights only matter through ``v_b − c v_a``), the
    other rows are solved on the Schur complement that removes the pairs' directions (nonsingular:
    the nonsingular route above, then an exact face polish) and each pair's weights split by least
    norm in closed form; each row is kept only when it meets the tolerance on ``G`` itself (at 256
    rows, 3x to 10x faster on the Jacobians it takes; at 1,024 rows, about 2 s instead of 6.5 min).
    Before that, when the rows positively span a subspace, every update is zero and the least-norm
    weights come from a Newton method in the range of ``G`` (``rank(G)``-sized systems per row);
    from ``m = 512``, when they do not, each row's update is first found in the range of ``G`` (the
    dual active-set method of Goldfarb and Idnani in ``rank(G)`` variables; warm-started from an
    ADMM guess of the active set when its first rows fail, as they do when the active sets hold
    hundreds of indices), then its least-norm weights by a Newton method on the constraints it
    meets, and only the rows it leaves go on to pivoting and the interior point. Each row's faces
    there cost :math:`O(|F|^3)`: on three hard Jacobians of 1,024 rows (more rows than columns;
    ranks 203, 226 and 351), 6 s, 11 s and 5 min against 0.3-1.6 s for the defaults. The KKT
    residual of each row, each row's conflict measured relative to its norm, is below ``1e-7`` in
    float64 and ``2e-5`` in float32; in exact mode, below ``1e-9`` in float64 on most Gramians, but
    on some degenerate ones (4 of 40 hard Jacobians of 64 rows) a few rows keep a larger
    complementarity term (up to ``2e-4``, also seen at 256 rows), where large weights sit on indices
    whose gradient is nearly zero: their conflict still meets the bound above, and their objective
    :math:`v^\top G v` is within ``3e-7`` (relative) of an independent non-negative least squares
    solution.

    **Gradients**: on a ``G`` (or ``U``) that requires grad, the weights are in its graph. The
    default mode backpropagates through the solver's own steps. The exact mode solves as without
    grad (the same values), then attaches each row through the derivative of its final face (the
    least-energy solution of :math:`G_{FF} v_F = -G_{FA} u_A` on its free set :math:`F`): exact
    where the weights are differentiable (the face and the rank of :math:`G_{FF}` stay), at a cost
    of one ``m × m`` eigendecomposition per row, kept for the backward pass (at 64 rows about 40 ms
    a call; at 256 rows seconds and about 1.5 GB).

    :param norm_eps: Trace below which the Gramian is treated as zero. Must be non-negative.
    :param reg_eps: Multiple of the identity added to the normalised Gramian. Must be non-negative;
        ``0.0`` (with ``norm_eps=0.0``) is the exact mode.

    >>> import torch
    >>> from torchjd.linalg import TorchProjector
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> TorchProjector()(torch.tensor([0.5, 0.0]), J @ J.T)
    tensor([0.5000, 0.2895])
    >>> TorchProjector(norm_eps=0.0, reg_eps=0.0)(torch.tensor([0.5, 0.0]), J @ J.T)
    tensor([0.5000, 0.2895])
    """

    norm_eps = hyperparameter(
        "norm_eps",
        _non_negative,
        "Trace below which the Gramian is treated as zero (non-negative).",
    )
    reg_eps = hyperparameter(
        "reg_eps",
        _non_negative,
        "Multiple of the identity added to the normalised Gramian (non-negative).",
    )

    def __init__(self, *, norm_eps: float = 0.0001, reg_eps: float = 0.0001) -> None:
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    def __call__(self, U: Tensor, G: PSDMatrix) -> Tensor:
        _check_shapes(U, G)
        return _untracked(lambda: self._project(U, G), U, G)

    def _project(self, U: Tensor, G: Tensor) -> Tensor:
        # Not symmetrised here: the solver does it.
        G = regularized(normalized(G, self.norm_eps), self.reg_eps)
        rows = U.unsqueeze(0) if U.ndim == 1 else U
        if self.reg_eps == 0.0:
            V = _exact_rows(partial(solve_lower_bounded_qp, least_norm=True), G, rows)
        else:
            V = solve_lower_bounded_qp(G, rows, least_norm=False)
        return V.squeeze(0) if U.ndim == 1 else V

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm_eps={self.norm_eps!r}, reg_eps={self.reg_eps!r})"

    def _summed_projections(self, p: Tensor | None, G: Tensor) -> Tensor:
        """``self(torch.diag(p), G).sum(dim=0)`` for a preference ``p ≥ 0`` (UPGrad's weights;
        None: the mean, ``p = 1 / m``).

        In the default mode up to ``m = 64`` (float32 and float64), the ``m`` problems are
        solved as those of the unit vectors, ``v(p_i e_i) = p_i v(e_i)``, with fewer operations
        (:func:`~torchjd.linalg._bounded_qp._small_unit_route`); the Gramian is normalised and
        regularised as by :meth:`__call__`, and the rows left take the general route. Beyond,
        also when their faces are cheap through ``G⁻¹``
        (:func:`~torchjd.linalg._bounded_qp._large_unit_route`), unless ``G`` or ``p``
        requires grad. In the exact mode up to ``m = 64``, the general route's own steps run on
        the unit vectors, without its tests of a diagonal ``U``
        (:meth:`_summed_exact_unit_rows`)."""
        m = G.shape[0]
        if self.reg_eps == 0.0 and m <= _DIRECT_MAX_M and self._summable(G):
            return _untracked(lambda: self._summed_exact_unit_rows(p, G), G, p)
        large = m > _DIRECT_MAX_M
        if (
            self.reg_eps == 0.0
            or not self._summable(G)
            or (large and (G.requires_grad or (p is not None and p.requires_grad)))
        ):
            if p is None:
                p = torch.full((m,), 1.0 / m, dtype=G.dtype, device=G.device)
            return self(torch.diag(p), G).sum(dim=0)
        if large:
            return _untracked(lambda: self._summed_large_unit_rows(p, G), G, p)
        return _untracked(lambda: self._summed_unit_rows(p, G), G, p, dtype=G.dtype)

    def _summable(self, G: Tensor) -> bool:
        """Whether :meth:`_summed_projections` may solve the problems of the unit vectors."""
        return (
            G.dtype in DEFAULT_TOL
            and type(self).__call__ in _SUMMABLE
            and getattr(self, "backend", "torch") == "torch"
        )

    def _summed_exact_unit_rows(self, p: Tensor | None, G: Tensor) -> Tensor:
        """:meth:`_summed_projections` in the exact mode up to ``m = 64``, through the
        least-norm weights of the unit vectors
        (:func:`~torchjd.linalg._bounded_qp._exact_unit_route`)."""
        G = symmetrized(normalized(G, self.norm_eps))
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)

        def unit_route(G: Tensor, _: Tensor) -> Tensor:  # (U: the identity)
            return _exact_unit_route(G, LEAST_NORM_TOL[G.dtype], _MAX_ITERS)

        X = _exact_rows(unit_route, G, eye)
        return X.mean(dim=0) if p is None else p.to(X.dtype) @ X

    def _summed_large_unit_rows(self, p: Tensor | None, G: Tensor) -> Tensor:
        """:meth:`_summed_projections` beyond ``m = 64``: through the problems of the unit vectors
        when their faces are cheap (:func:`~torchjd.linalg._bounded_qp._large_unit_route`), else
        by the general route on the rows ``p_i e_i``."""
        m = G.shape[0]
        # (G + Gᵀ) / tr(G + Gᵀ): the symmetrised G normalised, in one pass fewer; its trace is
        # twice that of G. A new tensor: regularised in place.
        G = normalized(G + G.T, 2.0 * self.norm_eps)
        G.diagonal().add_(self.reg_eps)
        tol = DEFAULT_TOL[G.dtype]
        X = _large_unit_route(G, tol, _MAX_ITERS)
        if p is None:
            p = torch.full((m,), 1.0 / m, dtype=G.dtype, device=G.device)
        if X is None:
            return _solve(G, torch.diag(p), tol, _MAX_ITERS, False).sum(dim=0)
        return p @ X

    def _summed_unit_rows(self, p: Tensor | None, G: Tensor) -> Tensor:
        """:meth:`_summed_projections` through the problems of the unit vectors, in float64 (the
        caller converts)."""
        m = G.shape[0]
        # (G + Gᵀ) / tr(G + Gᵀ): the symmetrised G normalised, in one pass fewer; its trace is
        # twice that of G. A new tensor: regularised in place.
        G = normalized(G + G.T, 2.0 * self.norm_eps)
        G.diagonal().add_(self.reg_eps)
        tol = DEFAULT_TOL[G.dtype]
        X, solved = _small_unit_route(G, tol)
        if not bool(solved.all()):
            rows = (~solved).nonzero().squeeze(1)
            eye = torch.eye(m, dtype=G.dtype, device=G.device)
            X[rows] = _solve(G, eye[rows], tol, _MAX_ITERS, False).to(X.dtype)
        return X.mean(dim=0) if p is None else p.to(X.dtype) @ X


class QuadprogProjector(TorchProjector):
    r"""The projector of the published library, under its name and with its semantics.

    Normalise the Gramian by its trace (or set it to zero when the trace is below ``norm_eps``),
    add ``reg_eps`` times the identity, and solve each problem
    :math:`\operatorname{argmin}_{v \ge u} v^\top G v`: the numbers are those of the published
    ``QuadprogProjector``, so code written for it (``UPGrad(projector=QuadprogProjector(
    reg_eps=1e-5))``) runs unchanged and gives the same results.

    It does not need the ``quadprog`` package: by default it runs on the torch solver of
    :class:`TorchProjector` (on any device, batched, and also when ``reg_eps=0``, where
    ``quadprog`` would fail). ``backend="quadprog"`` uses the real Goldfarb-Idnani solver of the
    ``quadprog`` package instead, one row at a time on the CPU in float64 (install it with
    ``pip install "torchjd[quadprog]"``); it needs a positive definite regularised Gramian.

    :param norm_eps: Trace below which the Gramian is treated as zero. Must be non-negative.
    :param reg_eps: Multiple of the identity added to the normalised Gramian. Must be non-negative.
    :param backend: ``"torch"`` (default) or ``"quadprog"``.

    >>> import torch
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.linalg import QuadprogProjector
    >>> UPGrad(projector=QuadprogProjector(reg_eps=1e-5))(torch.tensor([[-4.0, 1.0], [6.0, 1.0]]))
    tensor([0.1590, 1.9873])
    """

    norm_eps = TorchProjector.norm_eps  # (its own attributes, as published)
    reg_eps = TorchProjector.reg_eps

    def __init__(
        self,
        *,
        norm_eps: float = 0.0001,
        reg_eps: float = 0.0001,
        backend: Literal["torch", "quadprog"] = "torch",
    ) -> None:
        super().__init__(norm_eps=norm_eps, reg_eps=reg_eps)
        if backend not in ("torch", "quadprog"):
            raise ValueError(f'`backend` must be "torch" or "quadprog". Found {backend!r}.')
        if backend == "quadprog":
            _import_quadprog()
        self.backend = backend

    def __call__(self, U: Tensor, G: PSDMatrix) -> Tensor:
        if self.backend == "torch":
            return super().__call__(U, G)
        _check_shapes(U, G)
        return _solve_with_quadprog(U, G, self.norm_eps, self.reg_eps)

    def __repr__(self) -> str:
        text = super().__repr__()
        return text if self.backend == "torch" else f'{text[:-1]}, backend="quadprog")'


def _import_quadprog():  # noqa: ANN202 - returns the optional modules
    try:
        import numpy as np
        import quadprog
    except ImportError as error:
        raise ImportError(
            'QuadprogProjector(backend="quadprog") needs the optional packages quadprog and '
            'numpy: pip install "torchjd[quadprog]". The default backend="torch" needs neither.'
        ) from error
    return np, quadprog


def _solve_with_quadprog(U: Tensor, G: Tensor, norm_eps: float, reg_eps: float) -> Tensor:
    np, quadprog = _import_quadprog()
    G64 = regularized(normalized(symmetrized(G.detach().double().cpu()), norm_eps), reg_eps)
    P = 2 * G64.numpy()
    m = P.shape[0]
    rows = U.detach().double().cpu().reshape(-1, m).numpy()
    solutions = [quadprog.solve_qp(P, np.zeros(m), np.eye(m), u, 0)[0] for u in rows]
    V = torch.from_numpy(np.array(solutions).reshape(U.shape))
    return V.to(dtype=U.dtype, device=U.device)


def _check_shapes(U: Tensor, G: Tensor) -> None:
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(
            f"`G` must be a square matrix [m, m] with m ≥ 1. Found shape {tuple(G.shape)}."
        )
    if U.ndim not in (1, 2) or U.shape[-1] != G.shape[0]:
        raise ValueError(
            f"`U` must have shape [m] or [k, m] with m = {G.shape[0]} (the size of `G`). "
            f"Found shape {tuple(U.shape)}."
        )


def _untracked(
    compute: Callable[[], Tensor], *inputs: Tensor | None, dtype: torch.dtype | None = None
) -> Tensor:
    """``compute()`` (converted to ``dtype`` if given), in inference mode when no input requires
    grad: that skips the autograd bookkeeping of each operation (about a tenth of the time of a
    small problem). The result comes out as a normal tensor (one copy, the conversion's)."""
    requiring = [t for t in inputs if t is not None and t.requires_grad]
    if requiring:
        result = compute()
        if not result.requires_grad and torch.is_grad_enabled():
            # A route that found the weights constant (no conflict, a zero Gramian) built them
            # without the graph: attached, with a zero gradient (the mask never takes the sums).
            no = torch.zeros((), dtype=torch.bool, device=result.device)
            for t in requiring:
                result = torch.where(no, t.sum().to(result.dtype), result)
        return result if dtype is None else result.to(dtype)
    with torch.inference_mode():
        result = compute()
    return result.to(result.dtype if dtype is None else dtype, copy=True)


def _exact_rows(solve: Callable[[Tensor, Tensor], Tensor], G: Tensor, U: Tensor) -> Tensor:
    """``solve(G, U)``: the exact mode's optimal rows for ``U`` on ``G``. Under autograd (``G`` or
    ``U`` requiring grad, in float32 or float64), solved untracked, then attached to the graph by
    :func:`_face_attached` (on the symmetrised ``G``)."""
    if not (tracked(G, U) and G.dtype in DEFAULT_TOL):
        return solve(G, U)
    with torch.inference_mode():
        V = solve(G.detach(), U.detach())
    return _face_attached(symmetrized(G), U, V.clone())


def _face_attached(G: Tensor, U: Tensor, V: Tensor) -> Tensor:
    r"""The exact mode's optimal rows ``V`` for the rows ``U`` on a symmetric ``G`` (solved
    untracked), with their values, in the graph of ``G`` and ``U`` by the derivative of each row's
    final face: with the free set :math:`F = \{j : v_j > u_j\}` (beyond rounding: by more than
    :data:`_FREE_GAP` of the row's largest :math:`|v_j|`) and :math:`A` the others
    (:math:`v_A = u_A`), :math:`v_F` is the solution of :math:`G_{FF} v_F = -G_{FA} u_A` of least
    :math:`\sum_{j \in F} G_{jj} v_j^2`, :math:`v_F = S (S G_{FF} S)^+ S (-G_{FA} u_A)` with
    :math:`S = \operatorname{diag}(G)^{-1/2}` (``1`` where :math:`G_{jj} = 0`). The pseudo-inverse
    is taken on the range of :math:`S G_{FF} S` (eigenvalues above
    :data:`_FACE_RANK_TOL` of the largest), its basis held constant: the
    derivative along perturbations that keep that range (``J + t J R`` for ``G = J Jᵀ``: zero,
    duplicate and opposite rows stay so), where the weights are differentiable; across ranks they
    are not. Backpropagating through the solver's own steps instead gave NaN (failed factors of
    discarded rows) or gradients off by orders of magnitude (nearly singular faces)."""
    # (In float64: the rounding of float32 blurs the range; the rank is read at that of G's dtype.)
    rank_tol = _FACE_RANK_TOL[G.dtype]
    if not bool(torch.isfinite(G).all()):  # (NaN weights: in the graph, with NaN gradients)
        return V + ((G.sum() + U.sum()) * 0.0).to(V.dtype)
    dtype = torch.float64
    G, U, X = G.to(dtype), U.to(dtype), V.to(dtype)
    # Free where v_j exceeds u_j beyond the solver's rounding (the solver leaves some active
    # entries an ulp above u_j: read as free, their face was the wrong one).
    scale = X.abs().amax(dim=1, keepdim=True)
    rounding = _FREE_GAP.get(V.dtype, _FREE_GAP[torch.float32]) * scale
    gap = X - U
    free = (gap > rounding).to(dtype)
    diagonal = G.diagonal()
    tiny = torch.finfo(dtype).tiny
    s = torch.where(diagonal > 0, diagonal.clamp_min(tiny), 1.0).rsqrt()
    M = (s.unsqueeze(1) * G * s) * (free.unsqueeze(2) * free.unsqueeze(1))
    with torch.no_grad():
        values, Q = torch.linalg.eigh(M)
        keep = values > rank_tol * values.amax(dim=1, keepdim=True).clamp_min(tiny)
    # (S G_FF S)⁺ = B (Bᵀ S G_FF S B)⁻¹ Bᵀ for any basis B of its range: B = S G_FF S Q Λ⁻¹
    # (Q, Λ: its kept eigenpairs, held constant; B = Q in value) turns with the range, so the
    # derivative is that of the pseudo-inverse where the rank stays.
    inverse = torch.where(keep, 1.0 / torch.where(keep, values, 1.0), 0.0)
    B = (M @ Q) * inverse.unsqueeze(1)
    both = keep.unsqueeze(2) & keep.unsqueeze(1)
    eye = torch.eye(G.shape[0], dtype=dtype, device=G.device)
    K = torch.where(both, B.mT @ M @ B, eye)
    fixed = U * (1.0 - free)
    rhs = -(fixed @ G) * s * free
    c = torch.linalg.solve(K, (rhs.unsqueeze(1) @ B).squeeze(1) * keep) * keep
    face = fixed + s * free * (B @ c.unsqueeze(2)).squeeze(2)
    return (X + (face - face.detach())).to(V.dtype)


_MAX_ITERS = 10_000  # those of solve_lower_bounded_qp
# _face_attached: eigenvalues of the Jacobi-scaled face below this fraction of its largest are of
# its null space (at 10⁻¹³, the float64 rounding of G = J Jᵀ left some in the range: directional
# derivatives off by orders of magnitude on 9 of 200 hard Jacobians from m = 8 to 64).
_FACE_RANK_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# _face_attached: v_j - u_j at most this fraction of the row's largest |v_j| is active (rounding).
_FREE_GAP = {torch.float64: 1e-9, torch.float32: 1e-5}
# The __call__ methods under which TorchProjector._summed_projections may solve the problems of
# the unit vectors itself (a subclass with its own __call__ gets it called).
_SUMMABLE = (TorchProjector.__call__, QuadprogProjector.__call__)
