"""Name -> callable registries for things a user picks by name in a config.

Each registry has one call signature (documented where it is created), refuses a second entry under a
taken name, and answers an unknown name with the list of valid ones. Lookups also accept a callable,
which is returned as is.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Union


class Registry:
    """A named table of callables of one kind (``kind`` appears in error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator adding ``fn`` under ``name``; a taken name raises ``ValueError``."""

        def decorator(fn: Callable) -> Callable:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return decorator

    def get(self, name_or_fn: Union[str, Callable]) -> Callable:
        """The entry called ``name_or_fn`` (or the callable itself)."""
        if callable(name_or_fn):
            return name_or_fn
        try:
            return self._items[name_or_fn]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name_or_fn!r}; valid: {self.names()}") from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> Callable:
        return self.get(name)

    def __len__(self) -> int:
        return len(self._items)
