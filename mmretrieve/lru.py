"""A small thread-safe least-recently-used map: the per-snapshot filter selections, the service's facet and
map caches, its validated and shared rerankers all keep "the last N by key" the same way."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """At most ``size`` values by key; reading one makes it the most recent, adding one past ``size`` drops
    the least recent."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._d: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key not in self._d:
                return None
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key: Hashable, value: V) -> V:
        with self._lock:
            return self._put(key, value)

    def _put(self, key: Hashable, value: V) -> V:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)
        return value

    def setdefault(self, key: Hashable, value: V) -> V:
        """The value held for ``key`` (made the most recent), else ``value``, added; atomic, so concurrent
        callers all get the one value held."""
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
            return self._put(key, value)

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value for ``key``, else ``make()`` (called without the lock held: it may be slow), added."""
        got = self.get(key)
        return got if got is not None else self.put(key, make())


__all__ = ["LRU"]
