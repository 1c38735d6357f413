"""Jacobian descent for PyTorch.

Train on a *vector* of losses: the Jacobian (one gradient per loss) is reduced into one update by
an aggregator that avoids conflict with every loss whenever possible. See
:mod:`torchjd.aggregation`, :mod:`torchjd.autojac`, :mod:`torchjd.autogram`,
:mod:`torchjd.scalarization` and :mod:`torchjd.linalg`.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from torchjd._stateful import Stateful

try:
    __version__: str = version("torchjd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["Stateful", "__version__"]

_SUBPACKAGES = frozenset(
    {"aggregation", "autogram", "autojac", "distributed", "linalg", "scalarization"}
)


def __getattr__(name: str) -> ModuleType:
    """The subpackages as attributes of the package (``import torchjd`` then
    ``torchjd.autojac.backward(...)``), each imported on its first use, so that ``import torchjd``
    stays light."""
    if name in _SUBPACKAGES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES})
