"""A bounded, thread-safe map of task id to result handle, for the HTTP gateway.

Three limits keep it from growing without end: ``max_entries`` (the oldest
entry is evicted first when a new one would exceed it), ``max_age`` in seconds
(an entry older than that is gone; expired entries are evicted lazily, on
insert and on lookup) and ``max_bytes``, the total of the sizes the caller
gives its entries: an entry that does not fit is **refused**
(:class:`StoreFull`), nothing is evicted to make room for it. Evicting an
entry forgets the handle, nothing more: a call still running goes on, its
status just becomes unknown.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from dispatchkit._checks import count, seconds

__all__ = ["ResultStore", "StoreFull"]

V = TypeVar("V")


class StoreFull(Exception):
    """The entry does not fit in ``max_bytes``.

    ``retry_after`` is the seconds until room may be made (1 when entries that
    are not final yet could make it by shrinking, else until enough entries
    expire), or ``None`` when the entry is larger than ``max_bytes`` itself.
    """

    def __init__(self, size: int, retry_after: int | None) -> None:
        super().__init__(f"no room for {size} bytes")
        self.size = size
        self.retry_after = retry_after


class _Entry(Generic[V]):
    __slots__ = ("final", "inserted", "size", "value")

    def __init__(self, value: V, inserted: float, size: int) -> None:
        self.value = value
        self.inserted = inserted
        self.size = size
        self.final = False  # True once settle() gave it its last value and size


class ResultStore(Generic[V]):
    """Insertion-ordered entries, each kept until ``max_entries`` or ``max_age`` drops it.

    Each entry has a size in bytes, given by the caller; their total stays
    within ``max_bytes`` (no byte limit when ``None``). ``clock`` returns
    seconds on a monotonic scale (``time.monotonic`` by default); tests inject
    their own.
    """

    __slots__ = ("_bytes", "_clock", "_entries", "_lock", "max_age", "max_bytes", "max_entries")

    def __init__(
        self,
        max_entries: int,
        max_age: float,
        *,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        count(max_entries, "max_entries")
        seconds(max_age, "max_age")
        if max_bytes is not None:
            count(max_bytes, "max_bytes")
        self.max_entries = max_entries
        self.max_age = float(max_age)
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # insertion order is age order, oldest first
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """The total size of the entries present."""
        with self._lock:
            self._expire(self._clock())
            return self._bytes

    def add(self, key: str, value: V, size: int = 0) -> bool:
        """Insert ``value`` (``size`` bytes) under ``key`` unless the key is present.

        True when inserted, False when the key was present (nothing changes).
        Raises :class:`StoreFull` when it does not fit in ``max_bytes``; then
        nothing is evicted. Check and insert are one step, so two threads
        adding the same key cannot both succeed.
        """
        with self._lock:
            now = self._clock()
            self._expire(now)
            if key in self._entries:
                return False
            entries = self._entries
            evicted = max(0, len(entries) + 1 - self.max_entries)  # the oldest, for the count
            if self.max_bytes is not None:
                freed = sum(entry.size for entry in itertools.islice(entries.values(), evicted))
                if self._bytes - freed + size > self.max_bytes:
                    raise StoreFull(size, self._retry_after(now, size))
            for _ in range(evicted):
                self._bytes -= entries.popitem(last=False)[1].size
            entries[key] = _Entry(value, now, size)
            self._bytes += size
            return True

    def replace(self, key: str, value: V) -> None:
        """Swap the value of a present ``key``, keeping its age and size; nothing if it is gone."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.value = value

    def settle(self, key: str, expected: V, value: V, size: int) -> bool:
        """Give ``key`` its final ``value`` and ``size``, if its value is still ``expected``.

        The entry keeps its age. Its new size is counted even when the total
        then exceeds ``max_bytes`` (what is settled has already been made);
        new entries are refused until there is room again.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.value is not expected:
                return False
            self._bytes += size - entry.size
            entry.value, entry.size, entry.final = value, size, True
            return True

    def get(self, key: str) -> V | None:
        """The value under ``key``, or ``None`` when it was never added, evicted or expired."""
        with self._lock:
            self._expire(self._clock())
            entry = self._entries.get(key)
            return None if entry is None else entry.value

    def discard(self, key: str) -> None:
        """Remove ``key`` if present."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry.size

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._entries)

    def _expire(self, now: float) -> None:
        cutoff = now - self.max_age
        entries = self._entries
        while entries:
            entry = next(iter(entries.values()))
            if entry.inserted > cutoff:
                break
            entries.popitem(last=False)
            self._bytes -= entry.size

    def _retry_after(self, now: float, size: int) -> int | None:
        assert self.max_bytes is not None
        if size > self.max_bytes:
            return None
        needed = self._bytes + size - self.max_bytes
        if sum(entry.size for entry in self._entries.values() if not entry.final) >= needed:
            return 1  # entries not final yet (calls still running) may shrink any moment
        freed = 0
        for entry in self._entries.values():  # oldest first: the order they expire in
            freed += entry.size
            if freed >= needed:
                return max(1, math.ceil(entry.inserted + self.max_age - now))
        return 1  # unreachable: all of it expiring frees self._bytes >= needed

    def __repr__(self) -> str:
        limit = "" if self.max_bytes is None else f", max_bytes={self.max_bytes}"
        return (
            f"ResultStore({len(self._entries)} entries, {self._bytes} bytes, "
            f"max_entries={self.max_entries}, max_age={self.max_age:g}{limit})"
        )
