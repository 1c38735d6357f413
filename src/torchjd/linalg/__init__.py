"""Types and numerical kernels: Gramians and the projection onto the dual cone.

Everything here is a pure function of tensors, with no state, on any device and float dtype.
"""

from torchjd.linalg._dual_cone import DualConeProjector, QuadprogProjector, TorchProjector
from torchjd.linalg._matrix import Matrix, PSDMatrix

__all__ = ["DualConeProjector", "Matrix", "PSDMatrix", "QuadprogProjector", "TorchProjector"]
