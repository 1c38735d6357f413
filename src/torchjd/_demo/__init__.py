"""The ``torchjd demo`` command: Jacobian descent against ERM on scikit-learn's digits.

Private: imported only by :mod:`torchjd._cli`, lazily, because it needs the ``demo`` extra
(scikit-learn, matplotlib, tqdm) that the library itself never imports.
"""

from torchjd._demo._config import DemoConfig
from torchjd._demo._runner import run_demo

__all__ = ["DemoConfig", "run_demo"]
