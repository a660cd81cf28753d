"""Many threads, a pool smaller than the threads, and a server that misbehaves on purpose.

Each request draws its fate (``support.saboteur``) from a generator seeded by
its Idempotency-Key and how many times that key was seen: an ordinary answer,
interim (1xx) answers first, a reset in the middle of the answer, a body cut
off by a close, an answer slow enough to time out (and to starve the pool, so
that other calls time out waiting for a connection), or an answer followed by
a close, which leaves a stale keep-alive connection in the pool. Every
successful answer carries the key of the request it answers.

The properties: no call ever returns another call's answer, and every failure
is a typed dispatchkit error (never a bare ``DispatchError`` wrapping a plugin
failure, never a foreign exception). Bounded: 16 threads, 30 calls each, and a
per-connection deadline on the server.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from dispatchkit import DispatchError, DispatchTimeout
from support.saboteur import FATES, TYPED, Saboteur
from support.scripted_server import ScriptedServer

THREADS = 16
CALLS = 30


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
