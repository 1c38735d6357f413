r"""Generalized weightings (the API of older releases): weights for a tensor of objectives.

When the objectives form a tensor of shape :math:`[m_1, \dots, m_k]` (e.g. per sample and per
task), their generalized Gramian is the tensor of shape :math:`[m_1, \dots, m_k, m_k, \dots, m_1]`
with :math:`G_{i_1 \dots i_k, j_k \dots j_1} = \langle \nabla f_{i_1 \dots i_k},
\nabla f_{j_1 \dots j_k} \rangle`, and a generalized weighting maps it to weights of shape
:math:`[m_1, \dots, m_k]`. With :math:`k = 1` it is an ordinary Gramian.
"""

from abc import ABC, abstractmethod

from torch import Tensor, nn

from torchjd.linalg import PSDMatrix


class GeneralizedWeighting(nn.Module, ABC):
    r"""Maps a generalized Gramian of shape :math:`[m_1, \dots, m_k, m_k, \dots, m_1]` to weights
    of shape :math:`[m_1, \dots, m_k]`.

    Subclass it and implement :meth:`forward`; calling it first checks the shape of its input.
    :class:`Flattening` turns any :class:`Weighting` of the Gramian into one.
    """

    def __init__(self) -> None:
        super().__init__()

    @abstractmethod
    def forward(self, generalized_gramian: Tensor, /) -> Tensor:
        r"""Weights :math:`[m_1, \dots, m_k]` computed from the generalized Gramian."""

    def __call__(self, generalized_gramian: Tensor, /) -> Tensor:
        check_generalized_gramian(generalized_gramian, "generalized_gramian")
        return super().__call__(generalized_gramian)


def check_generalized_gramian(tensor: object, name: str) -> None:
    """A floating-point tensor of shape ``[m1..mk, mk..m1]``, ``k ≥ 1``, every ``mi ≥ 1``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape [m1, ..., mk, mk, ..., m1]. "
            f"Found {type(tensor).__name__}."
        )
    shape = tuple(tensor.shape)
    k = len(shape) // 2
    if len(shape) == 0 or len(shape) % 2 != 0 or shape[:k] != shape[k:][::-1] or 0 in shape:
        raise ValueError(
            f"`{name}` must have a shape [m1, ..., mk, mk, ..., m1] (the second half the first "
            f"one reversed, no empty dimension). Found `{name}.shape = {shape}`."
        )
    if not tensor.is_floating_point():
        raise TypeError(f"`{name}` must have a floating-point dtype. Found {tensor.dtype}.")


def flattened(generalized_gramian: Tensor) -> PSDMatrix:
    r"""The :math:`[M, M]` Gramian (:math:`M = m_1 \cdots m_k`) of the flattened objectives: the
    second half of the dimensions is put back in the order :math:`j_1 \dots j_k`, then each half is
    flattened (row-major, like ``reshape``)."""
    k = generalized_gramian.ndim // 2
    M = generalized_gramian.shape[:k].numel()
    order = [*range(k), *range(2 * k - 1, k - 1, -1)]
    return generalized_gramian.permute(order).reshape(M, M)
