r"""CR-MOGM: the weight smoothing of Zhou et al. (2022, "On the Convergence of Stochastic
Multi-Objective Gradient Manipulation and Beyond", NeurIPS).

Any weighting :math:`W` becomes a stateful weighting whose weights are an exponential moving
average of :math:`W`'s:

.. math::

    \lambda_k = \alpha\, \lambda_{k-1} + (1 - \alpha)\, \hat\lambda_k,
    \qquad \hat\lambda_k = W(\text{stat}_k),

where :math:`\lambda_0` is ``initial_weights``, or :math:`\hat\lambda_1` when None (so that the
first output is :math:`\hat\lambda_1`).
"""

from typing import Any, Generic, TypeVar

from torch import Tensor

from torchjd import Stateful
from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import Weighting
from torchjd.aggregation._checks import check_length, vector_hyperparameter
from torchjd.aggregation._parameters import check_unit_interval

_T = TypeVar("_T", contravariant=True)


class CRMOGMWeighting(Weighting[_T], Stateful, Generic[_T]):
    r"""The exponential moving average :math:`\lambda_k = \alpha \lambda_{k-1} + (1 - \alpha)
    W(\text{stat}_k)` of the weights of ``weighting``.

    :param weighting: The wrapped :class:`Weighting` (of the matrix or of its Gramian); its
        input is what this weighting receives.
    :param alpha: The weight :math:`\alpha \in [0, 1]` of the past: ``0`` returns
        ``weighting``'s output, ``1`` keeps :math:`\lambda_0`. It may be changed between calls
        (Corollary 1 of the paper lets it grow towards 1 as the learning rate decays).
    :param initial_weights: :math:`\lambda_0` (shape ``[m]``); the first weights of
        ``weighting`` when None.

    >>> import torch
    >>> from torchjd.aggregation import CRMOGMWeighting, GramianWeightedAggregator, UPGradWeighting
    >>> aggregator = GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting(), alpha=0.5))
    >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2929, 1.9004, 1.9004])
    >>> aggregator(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    tensor([0.8055, 0.6447, 0.0000])
    """

    weights: Tensor | None
    initial_weights = vector_hyperparameter(
        "initial_weights",
        "The weights averaged with the first ones (a detached copy), or None.",
    )
    alpha = hyperparameter(
        "alpha",
        check_unit_interval,
        r"The weight :math:`\alpha \in [0, 1]` of the previous weights in the average.",
    )

    def __init__(
        self, weighting: Weighting[_T], alpha: float = 0.9, initial_weights: Tensor | None = None
    ) -> None:
        super().__init__()
        if not isinstance(weighting, Weighting):
            raise TypeError(
                "`weighting` must be a torchjd.aggregation.Weighting (e.g. UPGradWeighting()). "
                f"Found {type(weighting).__name__}."
            )
        self.weighting = weighting
        self.alpha = alpha
        self.register_buffer("_initial_weights", None, persistent=False)
        self.initial_weights = initial_weights
        self.register_buffer("weights", None, persistent=False)

    def reset(self) -> None:
        self.weights = None
        if isinstance(self.weighting, Stateful):
            self.weighting.reset()

    def _check_stat(self, stat: Tensor) -> None:
        pass  # the wrapped weighting checks its own input

    def forward(self, stat: _T, /) -> Tensor:
        new = self.weighting(stat)  # type: ignore[arg-type]
        previous = self.weights
        if previous is None or previous.shape != new.shape:
            initial_weights = self.initial_weights
            if initial_weights is None:
                previous = new
            else:
                check_length(initial_weights, "initial_weights", new.shape[0], "matrix")
                previous = initial_weights
        previous = previous.to(dtype=new.dtype, device=new.device)
        weights = self.alpha * previous + (1 - self.alpha) * new
        self.weights = weights.detach()
        return weights

    def _params(self) -> dict[str, Any]:
        return {
            "weighting": self.weighting,
            "alpha": self.alpha,
            "initial_weights": self.initial_weights,
        }

    def __repr__(self) -> str:
        return (
            f"CRMOGMWeighting(weighting={self.weighting!r}, alpha={self.alpha!r}, "
            f"initial_weights={self.initial_weights!r})"
        )
