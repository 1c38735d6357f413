"""Jacobian descent for PyTorch.

Train on a *vector* of losses: the Jacobian (one gradient per loss) is reduced into one update by
an aggregator that avoids conflict with every loss whenever possible. See
:mod:`torchjd.aggregation`, :mod:`torchjd.autojac`, :mod:`torchjd.autogram`,
:mod:`torchjd.scalarization` and :mod:`torchjd.linalg`.
"""

from importlib.metadata import PackageNotFoundError, version

from torchjd._stateful import Stateful

try:
    __version__: str = version("torchjd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["Stateful", "__version__"]
