"""The rules that give each module type's block of the Gramian, and how users add their own."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from torchjd.autogram._module_call import ModuleCall

Rule = Callable[[nn.Module, Sequence[ModuleCall]], Tensor]
"""A rule maps a module and its calls of one forward pass to the Gramian ``[B R, B R]`` of the
Jacobian of the objectives w.r.t. the module's parameters (objective ``(i, r)`` at row
``i R + r``)."""


@dataclass(frozen=True)
class RuleEntry:
    rule: Rule
    covers_children: bool


_RULES: dict[type[nn.Module], RuleEntry] = {}


def register_rule(
    module_type: type[nn.Module], rule: Rule, *, covers_children: bool = False
) -> None:
    r"""Makes every :class:`~torchjd.autogram.Engine` use ``rule`` for modules of ``module_type``
    (and its subclasses that have no rule of their own).

    :param module_type: A subclass of :class:`torch.nn.Module`.
    :param rule: A function ``rule(module, calls) -> Tensor``. ``calls`` lists the
        :class:`~torchjd.autogram.ModuleCall` of the module in the forward pass (several when the
        module is called several times). It returns the Gramian ``[B R, B R]`` of the Jacobian of
        the objectives w.r.t. the module's direct trainable parameters, summed over the calls
        *before* the product (cross terms between calls included); objective ``(i, r)`` is at row
        ``i R + r``.
    :param covers_children: Whether ``rule`` also accounts for the parameters of the module's
        children (whose own rules are then not used). Needed when the module uses its children's
        parameters without calling the children.

    A rule for a module computing :math:`y = s \odot x` with a learnable vector :math:`s`: the
    gradient of objective :math:`(i, r)` w.r.t. :math:`s` is
    :math:`\sum_t \Gamma_{irt} \odot x_{it}`.

    >>> import torch
    >>> from torchjd.autogram import Engine, register_rule
    >>> class Scale(torch.nn.Module):
    ...     def __init__(self, dim: int) -> None:
    ...         super().__init__()
    ...         self.s = torch.nn.Parameter(torch.ones(dim))
    ...
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return self.s * x
    >>> def scale_rule(module, calls):
    ...     J = sum(
    ...         (call.grad_output(0) * call.args[0]).movedim(1, 0).flatten(start_dim=2)
    ...         for call in calls
    ...     )  # [B, R, dim]: batch_dim=0, inputs [B, dim]
    ...     J = J.flatten(end_dim=1)
    ...     return J @ J.T
    >>> register_rule(Scale, scale_rule)
    >>> scale = Scale(3)
    >>> engine = Engine(scale, batch_dim=0)
    >>> x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    >>> engine.compute_gramian(scale(x).sum(dim=1))
    tensor([[5., 2.],
            [2., 2.]])
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(
            f"Expected `module_type` to be a subclass of torch.nn.Module, got {module_type!r}."
        )
    if not callable(rule):
        raise TypeError(f"Expected `rule` to be callable, got {type(rule).__name__}.")
    _RULES[module_type] = RuleEntry(rule, covers_children)


def find_rule(module: nn.Module) -> RuleEntry | None:
    """The rule registered for the closest class of ``module``, or None (generic fallback)."""
    for cls in type(module).__mro__:
        entry = _RULES.get(cls)
        if entry is not None:
            return entry
    return None
