r"""Coordinate-wise trimmed mean (Yin et al., 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML).

In each column of ``J``, the ``t`` largest and the ``t`` smallest entries are dropped and the
remaining ``m − 2t`` are averaged:

.. math::

    \mathcal A(J)_k = \frac{1}{m - 2t} \sum_{r = t + 1}^{m - t} J_{(r), k},

where :math:`J_{(1), k} \le \dots \le J_{(m), k}` are the sorted entries of column ``k``. It is
not a weighting: each column has its own kept rows.
"""

from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import Aggregator
from torchjd.aggregation._parameters import check_non_negative_int
from torchjd.linalg import Matrix


class TrimmedMean(Aggregator):
    r"""The mean of each column after dropping its ``trim_number`` largest and smallest entries.

    :param trim_number: The number ``t ≥ 0`` of entries dropped at each end of each column. The
        matrix must have at least ``2t + 1`` rows.

    >>> import torch
    >>> from torchjd.aggregation import TrimmedMean
    >>> TrimmedMean(trim_number=1)(torch.tensor([[1.0, 9.0], [2.0, 0.0], [100.0, 1.0]]))
    tensor([2., 1.])
    """

    trim_number = hyperparameter(
        "trim_number",
        check_non_negative_int,
        "The number ``t ≥ 0`` of entries dropped at each end of each column.",
    )

    def __init__(self, trim_number: int) -> None:
        super().__init__()
        self.trim_number = trim_number

    def forward(self, matrix: Matrix, /) -> Tensor:
        m, t = matrix.shape[0], self.trim_number
        if m < 2 * t + 1:
            raise ValueError(
                f"TrimmedMean with `trim_number={t}` needs a matrix with at least "
                f"2 * trim_number + 1 = {2 * t + 1} rows. Found {m} rows."
            )
        return matrix.sort(dim=0).values[t : m - t].mean(dim=0)

    def __repr__(self) -> str:
        return f"TrimmedMean(trim_number={self.trim_number})"

    def __str__(self) -> str:
        return f"TM{self.trim_number}"
