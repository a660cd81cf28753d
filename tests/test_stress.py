"""Many threads, a pool smaller than the threads, and a server that misbehaves on purpose.

Each request draws its fate from a generator seeded by its Idempotency-Key and
how many times that key was seen: an ordinary answer, interim (1xx) answers
first, a reset in the middle of the answer, a body cut off by a close, an
answer slow enough to time out (and to starve the pool, so that other calls
time out waiting for a connection), or an answer followed by a close, which
leaves a stale keep-alive connection in the pool. Every successful answer
carries the key of the request it answers.

The properties: no call ever returns another call's answer, and every failure
is a typed dispatchkit error (never a bare ``DispatchError`` wrapping a plugin
failure, never a foreign exception). Bounded: 16 threads, 30 calls each, and a
per-connection deadline on the server.
"""

from __future__ import annotations

import collections
import random
import threading
from typing import Any

from dispatchkit import (
    DispatchError,
    DispatchTimeout,
    HTTPStatusError,
    InvalidResponseError,
    TransportError,
)
from support.scripted_server import Connection, ScriptedServer, envelope, response

THREADS = 16
CALLS = 30
FATES = ["ok"] * 8 + ["interim"] * 4 + ["reset", "cut", "slow", "close", "interim-close"]
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


def test_no_crossed_answers_and_no_untyped_errors(make_dispatcher: Any) -> None:
    saboteur = Saboteur()
    crossed: list[tuple[str, Any]] = []
    untyped: list[BaseException] = []
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    with ScriptedServer(saboteur, max_connections=20_000, connection_deadline=60) as server:
        d = make_dispatcher(timeout=0.25, pool_maxsize=4, retry_attempts=2)

        def worker(n: int) -> None:
            for i in range(CALLS):
                key = f"w{n}-c{i}"
                method = "GET" if i % 2 else "POST"
                try:
                    retval = d.apply(f"{server.url}/t", method, {"i": i}, task_id=key)
                except DispatchError as exc:
                    with lock:
                        if type(exc) is DispatchError or not isinstance(exc, TYPED):
                            untyped.append(exc)
                        pool_wait = "no pooled connection" in exc.message
                        outcomes["pool wait" if pool_wait else type(exc).__name__] += 1
                except BaseException as exc:
                    with lock:
                        untyped.append(exc)
                else:
                    with lock:
                        outcomes["ok"] += 1
                        if retval != key:
                            crossed.append((key, retval))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)

    assert crossed == []
    assert untyped == []
    assert sum(outcomes.values()) == THREADS * CALLS
    # The run did exercise every fate, and pool waits that timed out.
    assert set(saboteur.fates) == set(FATES)
    assert outcomes["ok"] > THREADS * CALLS // 2
    assert outcomes[DispatchTimeout.__name__] > 0
    assert outcomes["pool wait"] > 0
