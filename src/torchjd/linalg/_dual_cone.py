r"""Projection onto the dual cone of the rows of a matrix, in its dual (weight-space) form."""

from abc import ABC, abstractmethod

from torch import Tensor

from torchjd.linalg._bounded_qp import solve_lower_bounded_qp
from torchjd.linalg._gramian import normalized, regularized, symmetrized
from torchjd.linalg._matrix import PSDMatrix


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

    Before solving, the Gramian is divided by its trace (or replaced by zero when the trace is below
    ``norm_eps``) and ``reg_eps`` times the identity is added to it, as in Quinton & Rey (2024).
    These defaults make the problem scale-free and strongly convex; ``norm_eps=0.0`` and
    ``reg_eps=0.0`` solve the unregularised problem.

    All ``k`` problems share the factorisation of ``G``: small problems are solved exactly by an
    active-set method, larger ones by ADMM followed by an active-set polish (see
    ``torchjd/linalg/_bounded_qp.py``). The KKT residual of each solution, relative to
    ``max_j G_jj · max_j |u_j|``, is below ``1e-7`` in float64 and ``2e-5`` in float32.

    :param norm_eps: Trace below which the Gramian is treated as zero. Must be non-negative.
    :param reg_eps: Multiple of the identity added to the normalised Gramian. Must be non-negative.

    >>> import torch
    >>> from torchjd.linalg import TorchProjector
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> TorchProjector()(torch.tensor([0.5, 0.0]), J @ J.T)
    tensor([0.5000, 0.2895])
    """

    def __init__(self, *, norm_eps: float = 0.0001, reg_eps: float = 0.0001) -> None:
        _check_non_negative(norm_eps, "norm_eps")
        _check_non_negative(reg_eps, "reg_eps")
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)

    def __call__(self, U: Tensor, G: PSDMatrix) -> Tensor:
        _check_shapes(U, G)
        G = regularized(normalized(symmetrized(G), self.norm_eps), self.reg_eps)
        if U.ndim == 1:
            return solve_lower_bounded_qp(G, U.unsqueeze(0)).squeeze(0)
        return solve_lower_bounded_qp(G, U)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm_eps={self.norm_eps!r}, reg_eps={self.reg_eps!r})"


def _check_non_negative(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a float. Found {value!r} of type {type(value).__name__}."
        )
    if not value >= 0.0:  # also refuses NaN
        raise ValueError(f"`{name}` must be non-negative. Found {name}={value!r}.")


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
