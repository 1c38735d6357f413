r"""autojac: backpropagation of Jacobians into the ``.jac`` fields of the parameters, and their
aggregation into ``.grad``.

- :func:`backward` fills ``.jac`` with the Jacobian of several objectives (every element of the
  given tensors), :func:`jac` returns it instead;
- :func:`mtl_backward` does the multi-task case: ``.grad`` for the task-specific parameters,
  ``.jac`` for the shared ones;
- :func:`jac_to_grad` aggregates the ``.jac`` fields into ``.grad`` with an
  :class:`~torchjd.aggregation.Aggregator`.

All of them run on one Jacobian-backpropagation core: the rows of the Jacobian are
vector-Jacobian products through the same graph, batched with :func:`torch.vmap`
(``parallel_chunk_size`` rows at a time; 1 for no vmap at all).
"""

from torchjd.autojac._backward import backward
from torchjd.autojac._jac import jac
from torchjd.autojac._jac_to_grad import jac_to_grad
from torchjd.autojac._mtl_backward import mtl_backward

__all__ = ["backward", "jac", "jac_to_grad", "mtl_backward"]
