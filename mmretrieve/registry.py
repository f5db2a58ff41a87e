"""Name -> factory registries (encoders, rerankers, datasets).

A registry maps a short name to a factory. Registering the same name twice is an error unless
``override=True`` is passed, so a plugin cannot silently replace a built-in.

>>> from mmretrieve.registry import Registry
>>> shapes = Registry("shape")
>>> @shapes.register("square")
... def make_square(side=1):
...     return ("square", side)
>>> shapes.create("square", side=2)
('square', 2)
>>> shapes.names()
['square']
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from mmretrieve.errors import UnknownNameError, UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, *, override: bool = False, doc: str | None = None):
        """Decorator registering ``factory`` under ``name``."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and not override:
                raise UsageError(f"{self.kind} {name!r} is already registered (pass override=True to replace it)")
            self._entries[name] = factory
            self._docs[name] = doc or ((factory.__doc__ or "").strip().splitlines() or [""])[0]
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries))}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        return {n: self._docs.get(n, "") for n in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def lazy_exports(package: str, table: dict[str, str], namespace: dict[str, Any]):
    """A module ``__getattr__`` (PEP 562) that imports ``table[name]`` (a module path) on first access and
    caches the attribute in ``namespace``: packages export their API without importing torch up front."""
    import importlib

    def __getattr__(name: str):
        mod = table.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(mod), name)
        namespace[name] = value
        return value

    return __getattr__


__all__ = ["Registry", "UnknownNameError", "lazy_exports"]
