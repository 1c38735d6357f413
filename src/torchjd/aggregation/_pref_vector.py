"""What UPGrad and DualProj share: a preference vector and a dual-cone projector."""

from typing import Any

import torch
from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import GramianWeighting, vector_suffix
from torchjd.aggregation._checks import check_length, vector_hyperparameter
from torchjd.linalg import DualConeProjector, TorchProjector


def _check_projector(projector: object, name: str) -> DualConeProjector:
    if projector is None:
        return TorchProjector()
    if not isinstance(projector, DualConeProjector):
        raise TypeError(
            f"`{name}` must be a torchjd.linalg.DualConeProjector (e.g. TorchProjector()) "
            f"or None. Found {type(projector).__name__}."
        )
    return projector


class ProjectionWeighting(GramianWeighting):
    """A weighting of the Gramian defined by a preference vector and a dual-cone projector.

    The preference vector is a non-persistent buffer, so that ``.to(device)`` moves it.
    """

    pref_vector = vector_hyperparameter(
        "pref_vector",
        "The preference vector ``[m]`` (a detached copy of the one set, with no negative "
        "entry), or None for the mean.",
        non_negative=True,
    )
    projector = hyperparameter(
        "projector",
        _check_projector,
        "The :class:`~torchjd.linalg.DualConeProjector` that solves the projections (setting "
        "None sets a new :class:`~torchjd.linalg.TorchProjector`).",
    )

    def __init__(self, pref_vector: Tensor | None, projector: DualConeProjector | None) -> None:
        super().__init__()
        self.register_buffer("_pref_vector", None, persistent=False)
        self.pref_vector = pref_vector
        self.projector = projector

    def preference(self, gramian: Tensor) -> Tensor:
        """The preference vector ``[m]`` on the Gramian's device and dtype (mean by default)."""
        m = gramian.shape[0]
        pref_vector = self.pref_vector
        if pref_vector is None:
            return torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
        check_length(pref_vector, "pref_vector", m, "matrix")
        return pref_vector.to(dtype=gramian.dtype, device=gramian.device)

    def _params(self) -> dict[str, Any]:
        return {"pref_vector": self.pref_vector, "projector": self.projector}

    def _str_suffix(self) -> str:
        return vector_suffix(self.pref_vector)
