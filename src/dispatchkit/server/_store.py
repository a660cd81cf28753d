"""A bounded, thread-safe map of task id to result handle, for the HTTP gateway.

Two limits keep it from growing without end: ``max_entries`` (the oldest entry
is evicted first when a new one would exceed it) and ``max_age`` in seconds
(an entry older than that is gone; expired entries are evicted lazily, on
insert and on lookup). Evicting an entry forgets the handle, nothing more: a
call still running goes on, its status just becomes unknown.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["ResultStore"]

V = TypeVar("V")


class ResultStore(Generic[V]):
    """Insertion-ordered entries, each kept until ``max_entries`` or ``max_age`` drops it.

    ``clock`` returns seconds on a monotonic scale (``time.monotonic`` by
    default); tests inject their own.
    """

    __slots__ = ("_clock", "_entries", "_lock", "max_age", "max_entries")

    def __init__(
        self,
        max_entries: int,
        max_age: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        if isinstance(max_age, bool) or not isinstance(max_age, (int, float)) or not max_age > 0:
            raise ValueError(f"max_age must be a positive number of seconds, got {max_age!r}")
        self.max_entries = max_entries
        self.max_age = float(max_age)
        self._clock = clock
        self._lock = threading.Lock()
        # id -> (value, inserted at); insertion order is age order, oldest first
        self._entries: OrderedDict[str, tuple[V, float]] = OrderedDict()

    def add(self, key: str, value: V) -> bool:
        """Insert ``value`` under ``key`` unless the key is present; True when inserted.

        Check and insert are one step, so two threads adding the same key
        cannot both succeed.
        """
        with self._lock:
            now = self._clock()
            self._expire(now)
            if key in self._entries:
                return False
            while len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
            self._entries[key] = (value, now)
            return True

    def replace(self, key: str, value: V) -> None:
        """Swap the value of a present ``key``, keeping its age; do nothing if it is gone."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries[key] = (value, entry[1])

    def get(self, key: str) -> V | None:
        """The value under ``key``, or ``None`` when it was never added, evicted or expired."""
        with self._lock:
            self._expire(self._clock())
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def discard(self, key: str) -> None:
        """Remove ``key`` if present."""
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._entries)

    def _expire(self, now: float) -> None:
        cutoff = now - self.max_age
        entries = self._entries
        while entries:
            _, inserted = next(iter(entries.values()))
            if inserted > cutoff:
                break
            entries.popitem(last=False)

    def __repr__(self) -> str:
        return (
            f"ResultStore({len(self._entries)} entries, max_entries={self.max_entries}, "
            f"max_age={self.max_age:g})"
        )
