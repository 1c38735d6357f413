from abc import ABC, abstractmethod


class Stateful(ABC):
    """Mixin for objects that carry state from one call to the next.

    An aggregator, weighting or scalarizer that remembers something between calls (a moving
    average, a step counter, ...) inherits from :class:`Stateful`, so that its state is never
    hidden: :meth:`reset` brings it back to the state it had right after construction.
    """

    @abstractmethod
    def reset(self) -> None:
        """Forget everything learned from previous calls."""
