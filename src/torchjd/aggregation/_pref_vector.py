"""What UPGrad and DualProj share: a preference vector and a dual-cone projector."""

from typing import Any

import torch
from torch import Tensor

from torchjd.aggregation._bases import GramianWeighting, vector_suffix
from torchjd.aggregation._checks import check_length, check_vector
from torchjd.linalg import DualConeProjector, TorchProjector


class ProjectionWeighting(GramianWeighting):
    """A weighting of the Gramian defined by a preference vector and a dual-cone projector.

    The preference vector is a non-persistent buffer, so that ``.to(device)`` moves it.
    """

    pref_vector: Tensor | None

    def __init__(self, pref_vector: Tensor | None, projector: DualConeProjector | None) -> None:
        super().__init__()
        if pref_vector is not None:
            pref_vector = check_vector(pref_vector, "pref_vector", non_negative=True)
        self.register_buffer("pref_vector", pref_vector, persistent=False)
        if projector is None:
            projector = TorchProjector()
        elif not isinstance(projector, DualConeProjector):
            raise TypeError(
                "`projector` must be a torchjd.linalg.DualConeProjector (e.g. TorchProjector()) "
                f"or None. Found {type(projector).__name__}."
            )
        self.projector = projector

    def preference(self, gramian: Tensor) -> Tensor:
        """The preference vector ``[m]`` on the Gramian's device and dtype (mean by default)."""
        m = gramian.shape[0]
        if self.pref_vector is None:
            return torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
        check_length(self.pref_vector, "pref_vector", m, "matrix")
        return self.pref_vector.to(dtype=gramian.dtype, device=gramian.device)

    def _params(self) -> dict[str, Any]:
        return {"pref_vector": self.pref_vector, "projector": self.projector}

    def _str_suffix(self) -> str:
        return vector_suffix(self.pref_vector)
