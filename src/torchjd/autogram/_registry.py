"""The rules that give each module type's block of the Gramian, and how users add their own."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from torchjd.autogram._module_call import ModuleCall

Rule = Callable[[nn.Module, Sequence[ModuleCall]], Tensor]
"""A rule maps a module and its calls of one forward pass to the Gramian ``[B R, B R]`` of the
Jacobian of the objectives w.r.t. the module's parameters (objective ``(i, r)`` at row
``i R + r``)."""

WeightedGradients = Callable[
    [nn.Module, Sequence[ModuleCall], Tensor], list[tuple[Tensor, Tensor]] | None
]
r"""Maps a module, its calls and the weights ``W`` ``[B, R]`` of the objectives to the gradients of
the weighted objectives :math:`\sum_{ir} w_{ir} \ell_{ir}` w.r.t. the module's trainable
parameters, as ``(parameter, gradient)`` pairs, or None (the fused step then leaves them to a
second backward pass)."""


@dataclass(frozen=True)
class RuleEntry:
    rule: Rule
    covers_children: bool
    assumes: tuple[str, ...] = ()
    """The methods of the registered class that the rule relies on (a built-in rule's closed form
    is that of the class's own ``forward``): a subclass that overrides one of them gets the exact
    generic rule instead."""


_RULES: dict[type[nn.Module], RuleEntry] = {}


class _FusableRule:
    """A user's rule with its ``weighted_gradients`` function, whose answers are checked."""

    def __init__(self, rule: Rule, weighted_gradients: WeightedGradients) -> None:
        self.rule = rule
        self.user_weighted_gradients = weighted_gradients

    def __call__(self, module: nn.Module, calls: Sequence[ModuleCall]) -> Tensor:
        return self.rule(module, calls)

    def weighted_gradients(
        self, module: nn.Module, calls: Sequence[ModuleCall], W: Tensor
    ) -> list[tuple[Tensor, Tensor]] | None:
        pairs = self.user_weighted_gradients(module, calls, W)
        if pairs is None:
            return None
        name = getattr(self.user_weighted_gradients, "__name__", "weighted_gradients")
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(
                    f"Expected `{name}` (the weighted_gradients of the rule of "
                    f"{type(module).__name__}) to return (parameter, gradient) pairs, got "
                    f"{pair!r}."
                )
            param, grad = pair
            if id(param) not in trainable:
                raise ValueError(
                    f"`{name}` returned a gradient for a tensor that is not a trainable parameter "
                    f"of the {type(module).__name__} module."
                )
            if not isinstance(grad, Tensor) or grad.shape != param.shape:
                shape = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
                raise ValueError(
                    f"`{name}` returned a gradient of shape {shape} for a parameter of shape "
                    f"{tuple(param.shape)} of the {type(module).__name__} module."
                )
        return pairs


def register_rule(
    module_type: type[nn.Module],
    rule: Rule,
    *,
    covers_children: bool = False,
    weighted_gradients: WeightedGradients | None = None,
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
    :param weighted_gradients: Optional, for the fused step :meth:`Engine.backward
        <torchjd.autogram.Engine.backward>`: a function ``weighted_gradients(module, calls, W)``
        that returns the gradients of the weighted objectives :math:`\sum_{ir} w_{ir}
        \ell_{ir}` w.r.t. the module's trainable parameters, as ``(parameter, gradient)`` pairs,
        from what the calls recorded and the weights ``W`` ``[B, R]``
        (:meth:`ModuleCall.weighted_grad_output <torchjd.autogram.ModuleCall.weighted_grad_output>`
        gives the weighted output gradients), or None. Without it (or when it returns None), the
        fused step computes these gradients with a second backward pass. Their shapes are checked.

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

    The gradient of the weighted objectives w.r.t. :math:`s` is
    :math:`\sum_i \sum_t \bar\Gamma_{it} \odot x_{it}`: registering it lets the fused step skip
    the second backward pass.

    >>> from torchjd.aggregation import MeanWeighting
    >>> def scale_gradients(module, calls, W):
    ...     grad = sum((call.weighted_grad_output(W) * call.args[0]).sum(dim=0) for call in calls)
    ...     return [(module.s, grad)]
    >>> register_rule(Scale, scale_rule, weighted_gradients=scale_gradients)
    >>> engine = Engine(scale, batch_dim=0)
    >>> engine.backward(scale(x).sum(dim=1), MeanWeighting())
    tensor([0.5000, 0.5000])
    >>> scale.s.grad  # the mean of the inputs
    tensor([0.5000, 1.5000, 0.5000])
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(
            f"Expected `module_type` to be a subclass of torch.nn.Module, got {module_type!r}."
        )
    if not callable(rule):
        raise TypeError(f"Expected `rule` to be callable, got {type(rule).__name__}.")
    if weighted_gradients is not None:
        if not callable(weighted_gradients):
            raise TypeError(
                "Expected `weighted_gradients` to be callable or None, got "
                f"{type(weighted_gradients).__name__}."
            )
        rule = _FusableRule(rule, weighted_gradients)
    _RULES[module_type] = RuleEntry(rule, covers_children)


def register_builtin_rule(
    module_type: type[nn.Module],
    rule: Rule,
    *,
    covers_children: bool = False,
    assumes: tuple[str, ...] = ("forward",),
) -> None:
    """:func:`register_rule` for a built-in rule, which holds only for modules whose methods
    ``assumes`` are those of ``module_type`` (see :func:`find_rule`)."""
    _RULES[module_type] = RuleEntry(rule, covers_children, assumes)


def find_rule(module: nn.Module) -> RuleEntry | None:
    """The rule registered for the closest class of ``module``, or None (generic fallback).

    A module whose class overrides a method that a built-in rule relies on (a subclass of
    ``nn.Linear`` with its own ``forward``, say) gets the exact generic rule (over its children's
    parameters too when the built-in rule covers them): the closed form would be that of the
    parent's computation. So does a module whose instance has such a method of its own
    (``module.forward = ...``)."""
    for cls in type(module).__mro__:
        entry = _RULES.get(cls)
        if entry is None:
            continue
        if any(
            name in module.__dict__ or getattr(type(module), name) is not getattr(cls, name)
            for name in entry.assumes
        ):
            from torchjd.autogram._rules._generic import generic_rule, generic_subtree_rule

            generic = generic_subtree_rule if entry.covers_children else generic_rule
            return RuleEntry(generic, entry.covers_children)
        return entry
    return None
