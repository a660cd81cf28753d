"""Many asyncio tasks, a pool smaller than the tasks, a server that misbehaves on purpose.

The AsyncDispatcher's twin of ``tests/test_stress.py``, with the same
saboteur: each request draws its fate (an ordinary answer, interim answers
first, a reset mid-answer, a body cut by a close, an answer too slow for the
timeout, an answer then a close) from a generator seeded by its key, and
every answer carries the key of the request it answers. On top, the client
cancels every tenth call (``asyncio.wait_for`` with a short bound), so that
connections are also dropped mid-call from this side.

The properties: no call ever returns another call's answer, every failure is
a typed dispatchkit error (or the caller's own timeout), the loop reports no
stray error, and afterwards the connector holds no connection. Bounded: 16
tasks, 30 calls each, a per-connection deadline on the server, a 120 s bound
on the whole run.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from dispatchkit import AsyncDispatcher, DispatchError, DispatchTimeout
from dispatchkit.builtin.async_transport import AiohttpTransport
from support.saboteur import FATES, TYPED, Saboteur
from support.scripted_server import ScriptedServer

TASKS = 16
CALLS = 30


def in_use(d: AsyncDispatcher) -> int:
    """Connections handed out by the aiohttp connector and not given back.

    No public API tells: this reads ``AiohttpTransport._session`` and aiohttp's
    ``BaseConnector._acquired``, internals that may change.
    """
    transport = d._transports["http"]
    assert isinstance(transport, AiohttpTransport)
    assert transport._session is not None
    connector = transport._session.connector
    assert connector is not None
    return len(connector._acquired)


def test_no_crossed_answers_and_no_untyped_errors_under_asyncio() -> None:
    saboteur = Saboteur()
    crossed: list[tuple[str, Any]] = []
    untyped: list[BaseException] = []
    stray: list[dict[str, Any]] = []
    outcomes: collections.Counter[str] = collections.Counter()

    async def worker(d: AsyncDispatcher, url: str, n: int) -> None:
        for i in range(CALLS):
            key = f"w{n}-c{i}"
            method = "GET" if i % 2 else "POST"
            call = d.apply(url, method, {"i": i}, task_id=key)
            try:
                if i % 10 == 9:
                    retval = await asyncio.wait_for(call, 0.1)
                else:
                    retval = await call
            except DispatchError as exc:  # first: a DispatchTimeout is a TimeoutError too
                if type(exc) is DispatchError or not isinstance(exc, TYPED):
                    untyped.append(exc)
                outcomes[type(exc).__name__] += 1
            except asyncio.TimeoutError:  # the bound of wait_for: the call was cancelled
                outcomes["cancelled"] += 1
            except Exception as exc:
                untyped.append(exc)
            else:
                outcomes["ok"] += 1
                if retval != key:
                    crossed.append((key, retval))

    async def main(url: str) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: stray.append(context))
        async with AsyncDispatcher(timeout=0.25, pool_maxsize=4, retry_attempts=2) as d:
            await asyncio.wait_for(
                asyncio.gather(*(worker(d, f"{url}/t", n) for n in range(TASKS))), 120
            )
            await asyncio.sleep(0)
            return in_use(d)

    with ScriptedServer(saboteur, max_connections=20_000, connection_deadline=60) as server:
        left_in_use = asyncio.run(main(server.url))

    assert crossed == []
    assert untyped == []
    assert stray == []
    assert left_in_use == 0
    assert sum(outcomes.values()) == TASKS * CALLS
    # The run did exercise every fate, timeouts, and the client's own cancellations.
    assert set(saboteur.fates) == set(FATES)
    assert outcomes["ok"] > TASKS * CALLS // 2
    assert outcomes[DispatchTimeout.__name__] > 0
    assert outcomes["cancelled"] > 0
