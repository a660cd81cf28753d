"""The saboteur both stress tests run: a server script that misbehaves on purpose.

Each request draws its fate from a generator seeded by its Idempotency-Key and
how many times that key was seen: an ordinary answer, interim (1xx) answers
first, a reset in the middle of the answer, a body cut off by a close, an
answer slow enough to time out, or an answer followed by a close, which
leaves a stale keep-alive connection in the pool. Every successful answer
carries the key of the request it answers. Used by ``tests/test_stress.py``
(threads, the Dispatcher) and ``tests/test_async_stress.py`` (tasks, the
AsyncDispatcher).
"""

from __future__ import annotations

import collections
import random
import threading

from dispatchkit import HTTPStatusError, InvalidResponseError, TransportError
from support.scripted_server import Connection, envelope, response

__all__ = ["FATES", "TYPED", "Saboteur"]

#: The fates a request may draw, ordinary answers weighted most.
FATES = ["ok"] * 8 + ["interim"] * 4 + ["reset", "cut", "slow", "close", "interim-close"]
#: The typed errors a failed call may raise (DispatchTimeout is a TransportError).
TYPED = (TransportError, InvalidResponseError, HTTPStatusError)


class Saboteur:
    """The server's script: answers each request according to its drawn fate."""

    def __init__(self) -> None:
        self.seen: collections.Counter[str] = collections.Counter()
        self.fates: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def fate(self, key: str) -> str:
        with self.lock:
            self.seen[key] += 1
            fate = random.Random(f"{key}/{self.seen[key]}").choice(FATES)
            self.fates[fate] += 1
        return fate

    def __call__(self, conn: Connection) -> None:
        while (request := conn.read_request()) is not None:
            key = request.headers["idempotency-key"]
            answer = response(200, envelope(key))
            fate = self.fate(key)
            if fate == "ok":
                conn.send(answer)
            elif fate == "interim":
                # Early hints go out first; the answer follows once the task has run.
                conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
                conn.sleep(0.02)
                conn.send(answer)
            elif fate == "reset":
                conn.send(answer[: len(answer) // 2])
                conn.reset()
                return
            elif fate == "cut":
                conn.send(answer[:-3])
                conn.close()
                return
            elif fate == "slow":
                conn.sleep(0.4)  # past the client's timeout: it gives up and drops the connection
                conn.send(answer)
            elif fate == "close":
                conn.send(answer)
                conn.close()
                return
            else:  # interim, then the connection closes before the final answer
                conn.send(b"HTTP/1.1 102 Processing\r\n\r\n")
                conn.close()
                return
