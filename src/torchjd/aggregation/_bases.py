r"""Aggregators, weightings, and how they compose.

An :class:`Aggregator` reduces a matrix ``J`` of shape ``[m, n]`` (one row per objective) to a
vector of shape ``[n]``. Most aggregators are a :class:`Weighting` followed by a combination of the
rows: :math:`A(J) = w^\top J` with :math:`w = W(J)`, and most weightings only look at the Gramian
:math:`G = J J^\top`, so that :math:`A(J) = W(J J^\top)^\top J`.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from operator import methodcaller
from typing import Any, Generic, TypeVar

from torch import Tensor, nn

from torchjd._amp import without_autocast
from torchjd._properties import Hyperparameter, HyperparameterModule, forwarded
from torchjd.aggregation._checks import check_gramian, check_matrix, vector_str
from torchjd.linalg._gramian import gramian
from torchjd.linalg._matrix import Matrix, PSDMatrix

_T = TypeVar("_T", contravariant=True)
_S = TypeVar("_S")


class Weighting(HyperparameterModule, ABC, Generic[_T]):
    """Maps a statistic of a matrix ``[m, n]`` (the matrix itself, or its Gramian) to weights
    ``[m]``.

    Subclass :class:`Weighting[Matrix] <Weighting>` or :class:`Weighting[PSDMatrix] <Weighting>`
    and implement :meth:`forward`. Calling a weighting checks its input, then runs
    :meth:`forward` (forward hooks run as on any :class:`torch.nn.Module`), with ``torch.autocast``
    off: in the dtype of the input.
    """

    @abstractmethod
    def forward(self, stat: _T, /) -> Tensor:
        """Weights ``[m]`` computed from ``stat``."""

    def __call__(self, stat: Tensor, /) -> Tensor:
        self._check_stat(stat)
        with without_autocast(stat):  # (in the dtype of stat: see torchjd/_amp.py)
            return super().__call__(stat)

    def _check_stat(self, stat: Tensor) -> None:
        check_matrix(stat, "stat")

    def __lshift__(self, fn: "Callable[[_S], _T]") -> "Weighting[_S]":
        """The weighting ``x ↦ self(fn(x))``."""
        return _Composition(self, fn)

    def _params(self) -> dict[str, Any]:
        """Constructor arguments, shown by ``repr``."""
        return {}

    def _str_suffix(self) -> str:
        """What ``str`` shows after the name (a preference or weight vector), if anything."""
        return ""

    def __repr__(self) -> str:
        return _call_str(type(self).__name__, self._params())

    def __str__(self) -> str:
        return type(self).__name__ + self._str_suffix()


class GramianWeighting(Weighting[PSDMatrix], ABC):
    """A :class:`Weighting` of the Gramian ``G = J Jᵀ`` (shape ``[m, m]``) of the matrix."""

    def _check_stat(self, stat: Tensor) -> None:
        check_gramian(stat, "gramian")


class _Composition(Weighting[_S]):
    def __init__(self, weighting: Weighting[_T], fn: "Callable[[_S], _T]") -> None:
        super().__init__()
        self.weighting = weighting
        self.fn = fn

    def _check_stat(self, stat: Tensor) -> None:
        pass  # what ``fn`` accepts is its own business; its output is checked below

    def forward(self, stat: _S, /) -> Tensor:
        transformed = self.fn(stat)
        if self.fn is gramian:  # symmetric by construction: skip the (synchronising) check
            return call_unchecked(self.weighting, transformed)
        return self.weighting(transformed)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", repr(self.fn))
        return f"{self.weighting!r} << {name}"

    def __str__(self) -> str:
        return str(self.weighting)


def call_unchecked(weighting: Weighting[Any], stat: Tensor) -> Tensor:
    """Calls ``weighting`` (with its hooks) on a statistic known to be valid."""
    return nn.Module.__call__(weighting, stat)


def check_weighting(weighting: object, name: str) -> None:
    """``weighting`` is a :class:`Weighting` (wrappers check what they wrap)."""
    if not isinstance(weighting, Weighting):
        raise TypeError(
            f"`{name}` must be a torchjd.aggregation.Weighting (of a Gramian). "
            f"Found {type(weighting).__name__}."
        )


class Aggregator(HyperparameterModule, ABC):
    """Reduces a matrix ``[m, n]`` (one row per objective, e.g. a Jacobian) to a vector ``[n]``.

    Calling an aggregator checks that its input is a matrix with at least one row, then runs
    :meth:`forward` (forward hooks run as on any :class:`torch.nn.Module`), with ``torch.autocast``
    off: in the dtype of the input.
    """

    @abstractmethod
    def forward(self, matrix: Matrix, /) -> Tensor:
        """The aggregation ``[n]`` of ``matrix``."""

    def __call__(self, matrix: Tensor, /) -> Tensor:
        check_matrix(matrix, "matrix")
        with without_autocast(matrix):  # (in the dtype of matrix: see torchjd/_amp.py)
            return super().__call__(matrix)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __str__(self) -> str:
        return type(self).__name__


class WeightedAggregator(Aggregator):
    r"""The aggregator :math:`J \mapsto W(J)^\top J` of a weighting :math:`W` of the matrix.

    :param weighting: The :class:`Weighting` that gives the weights of the rows.
    """

    def __init__(self, weighting: Weighting[Matrix]) -> None:
        super().__init__()
        self.weighting = weighting

    def forward(self, matrix: Matrix, /) -> Tensor:
        weights = call_unchecked(self.weighting, matrix)
        return weights @ matrix

    def __repr__(self) -> str:
        return _call_str(type(self).__name__, self._weighting_params())

    def __str__(self) -> str:
        return type(self).__name__ + self._inner_weighting()._str_suffix()

    def _inner_weighting(self) -> Weighting[Any]:
        return self.weighting

    def _weighting_params(self) -> dict[str, Any]:
        if type(self) is WeightedAggregator:
            return {"weighting": self.weighting}
        if type(self) is GramianWeightedAggregator:
            return {"gramian_weighting": self._inner_weighting()}
        return self._inner_weighting()._params()  # a named method: show its own parameters


class GramianWeightedAggregator(WeightedAggregator):
    r"""The aggregator :math:`J \mapsto W(J J^\top)^\top J` of a weighting :math:`W` of the
    Gramian.

    :param gramian_weighting: The :class:`Weighting` of the Gramian ``[m, m]``.

    >>> import torch
    >>> from torchjd.aggregation import GramianWeightedAggregator, UPGradWeighting
    >>> aggregator = GramianWeightedAggregator(UPGradWeighting())
    >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2929, 1.9004, 1.9004])
    """

    def __init__(self, gramian_weighting: Weighting[PSDMatrix]) -> None:
        super().__init__(gramian_weighting << gramian)

    @property
    def gramian_weighting(self) -> Weighting[PSDMatrix]:
        """The weighting of the Gramian, called on ``J Jᵀ`` by :meth:`forward`."""
        return self.weighting.weighting

    def _inner_weighting(self) -> Weighting[Any]:
        return self.gramian_weighting


def of_weighting(target: Hyperparameter[_S]) -> Hyperparameter[_S]:
    """The property ``target`` of the weighting that a :class:`WeightedAggregator` wraps, read and
    set through the aggregator (the weighting holds the value)."""
    return forwarded(target, methodcaller("_inner_weighting"))


def _call_str(name: str, params: dict[str, Any]) -> str:
    arguments = ", ".join(f"{key}={value!r}" for key, value in params.items())
    return f"{name}({arguments})"


def vector_suffix(vector: Tensor | None) -> str:
    """``"([0.12, 2.])"`` for a vector, ``""`` for None (used by ``str``)."""
    return "" if vector is None else f"({vector_str(vector)})"
