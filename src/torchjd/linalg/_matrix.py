from torch import Tensor


class Matrix(Tensor):
    """Type of a 2-D tensor ``[m, n]`` whose ``m`` rows are vectors to combine (a Jacobian).

    Used only in type annotations (``Weighting[Matrix]``): any 2-D :class:`torch.Tensor` is
    accepted where a :class:`Matrix` is expected, and no instance of this class is ever created.
    """


class PSDMatrix(Matrix):
    """Type of a symmetric positive semi-definite ``[m, m]`` tensor, usually a Gramian ``J Jᵀ``.

    Used only in type annotations (``Weighting[PSDMatrix]``), like :class:`Matrix`.
    """
