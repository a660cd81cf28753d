"""A total deadline per attempt, on top of the per-operation socket timeout.

A socket timeout bounds each ``recv``; a server that trickles one byte a
second never trips it, and could hold a call for hours. The watchdog keeps
the sockets of the attempts in flight with their deadlines and shuts down a
socket whose attempt has run past it: the blocked read returns at once and
the transport reports a :class:`~dispatchkit.DispatchTimeout`.

Registering costs two dict operations per attempt; the watchdog's thread is
started at the first registration and wakes ``interval`` times a second.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time


class Watchdog:
    """Shuts down watched sockets whose deadline (``time.monotonic()``) has passed."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._entries: dict[int, tuple[float, socket.socket]] = {}
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, sock: socket.socket, deadline: float) -> int:
        """Watch ``sock`` until :meth:`unwatch`; return the token for that."""
        token = next(self._tokens)
        self._entries[token] = (deadline, sock)
        if self._pid != os.getpid():  # first use, or in a forked child: no thread here yet
            self._start()
        return token

    def unwatch(self, token: int) -> None:
        self._entries.pop(token, None)

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
            for token, (deadline, sock) in list(self._entries.items()):
                if deadline <= now and self._entries.pop(token, None) is not None:
                    # An OSError means it is closed already: nothing left to interrupt.
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop the thread (waits at most a few intervals); watched sockets are left alone."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout=max(1.0, 10 * self.interval))
        self._entries.clear()
