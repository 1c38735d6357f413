"""Hyperparameters exposed as properties that can be read and set.

A hyperparameter's value is kept in a private attribute (``_name``) and set only through its
check, the one that the constructor uses too (the constructor assigns through the property): a
value that the constructor refuses is refused by the setter with the same exception, before
anything is stored, so that an invalid assignment leaves the object unchanged.
"""

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from torch import nn

T = TypeVar("T")


class Hyperparameter(property, Generic[T]):
    """A :class:`property` whose value has the type ``T`` for static type checkers (a property
    made by a function is typed ``Any``); at run time, a plain property."""

    if TYPE_CHECKING:

        @overload
        def __get__(self, instance: None, owner: type | None = None) -> "Hyperparameter[T]": ...

        @overload
        def __get__(self, instance: object, owner: type | None = None) -> T: ...

        def __get__(self, instance: object, owner: type | None = None) -> Any: ...

        def __set__(self, instance: object, value: T) -> None: ...


def hyperparameter(name: str, check: Callable[[Any, str], T], doc: str) -> Hyperparameter[T]:
    """The property ``name``, stored as ``check(value, name)`` in ``_name``, of the type that
    ``check`` returns (its return annotation).

    ``check`` raises (an exception whose message names ``name``) on an invalid value and returns
    the value to store otherwise.
    """
    attribute = f"_{name}"
    kind = inspect.signature(check).return_annotation

    def fget(self: Any) -> Any:
        return getattr(self, attribute)

    def fset(self: Any, value: Any) -> None:
        setattr(self, attribute, check(value, name))

    fget.__name__ = fset.__name__ = name
    fget.__annotations__ = {"return": kind}
    fset.__annotations__ = {"value": kind, "return": None}
    return Hyperparameter(fget, fset, doc=doc)


def forwarded(target: Hyperparameter[T], owner: Callable[[Any], Any]) -> Hyperparameter[T]:
    """The property ``target`` of the object ``owner(self)``, read and set through ``self``.

    The value lives only in that object (an aggregator forwards to the weighting that it wraps),
    so the two can never disagree.
    """
    get, set_ = target.fget, target.fset
    assert get is not None
    assert set_ is not None

    def fget(self: Any) -> Any:
        return get(owner(self))

    def fset(self: Any, value: Any) -> None:
        set_(owner(self), value)

    fget.__name__ = fset.__name__ = get.__name__
    fget.__annotations__ = dict(get.__annotations__)
    fset.__annotations__ = dict(set_.__annotations__)
    return Hyperparameter(fget, fset, doc=target.__doc__)


class HyperparameterModule(nn.Module):
    """A :class:`torch.nn.Module` whose class's properties (its hyperparameters) receive every
    value set, a :class:`torch.nn.Parameter` included (which ``nn.Module`` would try to register
    under the property's name). Its constructor takes no argument."""

    def __init__(self) -> None:
        super().__init__()

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)
