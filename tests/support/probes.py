"""What the tests watch from the client's side: its attempts, and a port nobody answers on.

Shared by the sync-only tests and the fault table run against both drivers
(``tests/test_async_faults.py``), so the two count attempts the same way.
"""

from __future__ import annotations

import socket
import time

from dispatchkit import Request, hookimpl

__all__ = ["Attempts", "free_port"]


class Attempts:
    """Records every attempt (prepare_request runs once per attempt): its number, its
    Idempotency-Key and when it left."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, float]] = []

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self.seen.append((request.attempt, request.headers["Idempotency-Key"], time.monotonic()))

    @property
    def numbers(self) -> list[int]:
        return [n for n, _, _ in self.seen]

    @property
    def keys(self) -> set[str]:
        return {key for _, key, _ in self.seen}

    def gap(self, i: int) -> float:
        """Seconds between attempt ``i`` and the one before it (0-based)."""
        return self.seen[i][2] - self.seen[i - 1][2]


def free_port() -> int:
    """A port nothing listens on (the kernel just handed it out and took it back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
