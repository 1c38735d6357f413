r"""Aligned-MTL (Senushkin et al., 2023, "Independent Component Alignment for Multi-Task
Learning", CVPR, Algorithm 1).

Aligned-MTL makes the gradients orthogonal and of equal norm (a condition number of one) before
combining them. With the eigendecomposition of the Gramian :math:`G = V \Lambda V^\top`
(restricted to its positive eigenvalues), the balance transformation and the weights are

.. math::

    B = \sqrt{\sigma}\, V \Lambda^{-1/2} V^\top, \qquad w = B p ,

so that the rows of :math:`B J` are orthogonal with squared norm :math:`\sigma`. The scale
:math:`\sigma` is the smallest positive eigenvalue (``"min"``, the paper's choice), their median
(``"median"``, the lower one for an even count) or their mean (``"rmse"``).
"""

from typing import Any, Literal

import torch
from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import (
    GramianWeightedAggregator,
    GramianWeighting,
    of_weighting,
    vector_suffix,
)
from torchjd.aggregation._checks import check_length, vector_hyperparameter
from torchjd.aggregation._non_finite import finite_stand_in, nan_unless
from torchjd.linalg import PSDMatrix

ScaleMode = Literal["min", "median", "rmse"]
_SCALE_MODES = ("min", "median", "rmse")


def _check_scale_mode(scale_mode: object, name: str) -> ScaleMode:
    if scale_mode not in _SCALE_MODES:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, _SCALE_MODES))}. "
            f"Found {name}={scale_mode!r}."
        )
    return scale_mode  # type: ignore[return-value]


class AlignedMTLWeighting(GramianWeighting):
    r"""The weighting of :class:`AlignedMTL`: :math:`w = \sqrt{\sigma}\, V \Lambda^{-1/2}
    V^\top p`.

    :param pref_vector: The preference :math:`p` (shape ``[m]``); the mean
        :math:`\mathbf 1 / m` when None.
    :param scale_mode: How :math:`\sigma` is taken from the positive eigenvalues: ``"min"``,
        ``"median"`` or ``"rmse"`` (the mean).

    >>> import torch
    >>> from torchjd.aggregation import AlignedMTLWeighting
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> AlignedMTLWeighting()(J @ J.T)
    tensor([0.5591, 0.4083])
    """

    pref_vector = vector_hyperparameter(
        "pref_vector",
        "The preference vector ``[m]`` (a detached copy of the one set), or None for the mean.",
    )
    scale_mode = hyperparameter(
        "scale_mode",
        _check_scale_mode,
        "How :math:`\\sigma` is taken from the positive eigenvalues: ``'min'``, ``'median'`` or "
        "``'rmse'``.",
    )

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min") -> None:
        super().__init__()
        self.register_buffer("_pref_vector", None, persistent=False)
        self.pref_vector = pref_vector
        self.scale_mode = scale_mode

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        G, finite = finite_stand_in(gramian)
        m = G.shape[0]
        pref_vector = self.pref_vector
        if pref_vector is None:
            p = torch.full((m,), 1.0 / m, dtype=G.dtype, device=G.device)
        else:
            check_length(pref_vector, "pref_vector", m, "matrix")
            p = pref_vector.to(dtype=G.dtype, device=G.device)
        eigenvalues, V = torch.linalg.eigh(G)
        tolerance = m * torch.finfo(G.dtype).eps * eigenvalues[-1].clamp_min(0.0)
        positive = eigenvalues > tolerance
        sigma = self._scale(eigenvalues, positive)
        inverse_root = torch.where(positive, eigenvalues.clamp_min(1e-300).rsqrt(), 0.0)
        B = sigma.sqrt() * (V * inverse_root) @ V.T
        return nan_unless(finite, B @ p)

    def _scale(self, eigenvalues: Tensor, positive: Tensor) -> Tensor:
        if self.scale_mode == "min":
            return torch.where(positive, eigenvalues, torch.inf).min().nan_to_num(posinf=0.0)
        if self.scale_mode == "rmse":
            return torch.where(positive, eigenvalues, 0.0).sum() / positive.sum().clamp_min(1)
        # The lower median of the positive eigenvalues (sorted ascending, after the others).
        k = positive.sum()
        index = (eigenvalues.shape[0] - k + (k - 1).clamp_min(0) // 2).clamp_max(
            eigenvalues.shape[0] - 1
        )
        return torch.where(k > 0, eigenvalues[index], 0.0)

    def _params(self) -> dict[str, Any]:
        return {"pref_vector": self.pref_vector, "scale_mode": self.scale_mode}

    def _str_suffix(self) -> str:
        return vector_suffix(self.pref_vector)


class AlignedMTL(GramianWeightedAggregator):
    r"""The Aligned-MTL aggregator (Senushkin et al., 2023): the preference-weighted combination
    of the rows after a linear transformation makes them orthogonal and of equal norm.

    :param pref_vector: The preference :math:`p` (shape ``[m]``); the mean when None.
    :param scale_mode: ``"min"``, ``"median"`` or ``"rmse"``: the eigenvalue of the Gramian
        that sets the common squared norm of the transformed rows.

    >>> import torch
    >>> from torchjd.aggregation import AlignedMTL
    >>> AlignedMTL()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2133, 0.9673, 0.9673])
    """

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min") -> None:
        super().__init__(AlignedMTLWeighting(pref_vector, scale_mode))

    pref_vector = of_weighting(AlignedMTLWeighting.pref_vector)
    scale_mode = of_weighting(AlignedMTLWeighting.scale_mode)
