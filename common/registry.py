"""The one registry idiom: objectives, corpus sources, checkpoint formats, sharding engines and evaluators are
each a ``Registry`` of named entries.

An entry is registered once, where it is defined (``REGISTRY.add(name, entry)`` or the ``@REGISTRY.register(name)``
decorator). Where matching decides which entry handles an input (a source for a path, a format for a
``config.json``), ``priority`` orders the candidates explicitly, highest first, ties in registration order, so a
new entry never silently wins or loses because of import order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[Exception] = ValueError):
        self.kind = kind  # what an entry is called in messages: "objective", "source", "export format"
        self.error = error
        self._entries: dict[str, tuple[int, int, T]] = {}

    def add(self, name: str, entry: T, priority: int = 0) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = (priority, len(self._entries), entry)
        return entry

    def register(self, name: str, priority: int = 0) -> Callable[[T], T]:
        """Decorator form of ``add``."""
        return lambda entry: self.add(name, entry, priority)

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name is one line listing the known ones."""
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r} (known: {', '.join(self.names())})")
        return self._entries[name][2]

    def names(self) -> list[str]:
        """Every name, in matching order (priority, then registration)."""
        return [name for name, _ in self.items()]

    def items(self) -> list[tuple[str, T]]:
        ordered = sorted(self._entries.items(), key=lambda kv: (-kv[1][0], kv[1][1]))
        return [(name, entry) for name, (_, _, entry) in ordered]

    def first(self, accepts: Callable[[T], bool]) -> tuple[str, T] | None:
        """The highest-priority entry that ``accepts``, or None."""
        return next(((name, entry) for name, entry in self.items() if accepts(entry)), None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
