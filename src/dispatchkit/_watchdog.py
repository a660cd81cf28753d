"""A total deadline per attempt, on top of the per-operation socket timeout.

A socket timeout bounds each ``recv``; a server that trickles one byte a
second never trips it, and could hold a call for hours. The watchdog knows
the transport's open connections (registered once, when each is made); a
connection in use carries its attempt's deadline in an attribute, and the
watchdog shuts down the socket of one that has run past it: the blocked read
returns at once and the transport reports a :class:`~dispatchkit.DispatchTimeout`.

Per request this costs one attribute store, and one more when the connection
goes back to its pool; the watchdog's thread starts with the first
connection and wakes ``interval`` times a second.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Protocol


class Watched(Protocol):
    """A connection: its socket, and the deadline (``time.monotonic()``) of its attempt."""

    sock: socket.socket | None
    _dk_deadline: float | None


class Watchdog:
    """Shuts down the sockets of watched connections whose deadline has passed."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._watched: dict[int, Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, conn: Watched) -> None:
        """Watch ``conn`` until :meth:`unwatch`; its ``_dk_deadline`` says when to cut it."""
        self._watched[id(conn)] = conn
        if self._pid != os.getpid():  # first use, or in a forked child: no thread here yet
            self._start()

    def unwatch(self, conn: Watched) -> None:
        self._watched.pop(id(conn), None)

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid() or self._stop.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name="dispatchkit-watchdog", daemon=True
            )
            self._thread.start()
            self._pid = os.getpid()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            for conn in list(self._watched.values()):
                deadline, sock = conn._dk_deadline, conn.sock
                if deadline is not None and deadline <= now and sock is not None:
                    conn._dk_deadline = None
                    # An OSError means it is closed already: nothing left to interrupt.
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop the thread (waits at most a few intervals); connections are left alone."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout=max(1.0, 10 * self.interval))
        self._watched.clear()
