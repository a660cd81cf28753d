"""Cancelling AsyncDispatcher calls: the connection is dropped, nothing arrives later.

A scripted server on 127.0.0.1 reads the request and never answers (or
answers half), then waits for the client to close the connection, which it
counts (``peer_closed``). The test cancels the task awaiting the call once
the server holds the request, and checks what docs/plugins.md promises of
an async transport: ``CancelledError`` propagates, the request's connection
is dropped (the server sees the close, the connector holds nothing), the next
call works on a fresh connection, and no outcome is ever delivered for the
cancelled call (``call_done`` is not called, the loop reports no stray error).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from dispatchkit import AsyncDispatcher, Outcome, Request, hookimpl
from dispatchkit.builtin.async_transport import AiohttpTransport
from support.scripted_server import (
    Connection,
    RawRequest,
    ScriptedServer,
    envelope,
    per_connection,
    response,
    serve,
)

T = TypeVar("T")
WAIT = 5.0  # bound on every wait for the server


class Done:
    """Every call_done, by task id."""

    def __init__(self) -> None:
        self.task_ids: list[str] = []

    @hookimpl
    def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
        self.task_ids.append(request.task_id)


def run(main: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run``, with every error the loop would only have logged collected and
    raised at the end (a task's exception never retrieved, a callback that failed)."""
    stray: list[dict[str, Any]] = []

    async def bounded() -> T:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: stray.append(context))
        return await asyncio.wait_for(main(), timeout=60)

    result = asyncio.run(bounded())
    assert stray == []
    return result


def dispatcher(done: Done, **settings: Any) -> AsyncDispatcher:
    settings.setdefault("timeout", 5)
    settings.setdefault("retry_backoff", 0.01)
    return AsyncDispatcher(plugins=[done], **settings)


def in_use(d: AsyncDispatcher) -> int:
    """Connections the aiohttp connector has handed out and not had back.

    aiohttp has no public count of the connections in use, so this reads the
    transport's session (``AiohttpTransport._session``) and the connector's
    ``_acquired`` set, internals that may change with either.
    """
    transport = d._transports["http"]
    assert isinstance(transport, AiohttpTransport)
    session = transport._session
    assert session is not None
    connector = session.connector
    assert connector is not None
    return len(connector._acquired)


async def until(server: ScriptedServer, condition: Callable[[ScriptedServer], bool]) -> None:
    """Wait (in a thread, so the loop runs on) until the server's counters satisfy it."""
    assert await asyncio.to_thread(server.wait_until, condition, WAIT), server.counts


def silent(conn: Connection) -> None:
    """Read the request, answer nothing, wait until the client hangs up."""
    if conn.read_request() is not None:
        conn.wait_for_close()


def half_answer(conn: Connection) -> None:
    """Read the request, send the head and half the body, wait until the client hangs up."""
    if conn.read_request() is not None:
        answer = response(200, envelope("x" * 1000))
        conn.send(answer[: len(answer) - 500])
        conn.wait_for_close()


def echo(request: RawRequest) -> bytes:
    return response(200, envelope(request.body.decode() or request.target))


@pytest.mark.parametrize("script", [silent, half_answer], ids=["no-answer", "half-the-body"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_cancelled_call_drops_its_connection_and_delivers_nothing(
    script: Callable[[Connection], None], method: str
) -> None:
    done = Done()

    async def main(server: ScriptedServer) -> None:
        async with dispatcher(done) as d:
            url = f"{server.url}/t"
            call = asyncio.create_task(d.apply(url, method, {"x": 1}, task_id="cancelled"))
            await until(server, lambda s: len(s.requests) == 1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert call.cancelled()
            await until(server, lambda s: s.peer_closed == 1)  # the connection was dropped
            assert in_use(d) == 0
            # the next call works, on a connection of its own
            assert await d.apply(url, method, {"x": 2}, task_id="next") in ("x=2", "/t?x=2")
            assert [r.connection for r in server.requests] == [0, 1]
            await asyncio.sleep(0.2)  # anything late for the cancelled call would come by now
            assert done.task_ids == ["next"]
            assert in_use(d) == 0

    with ScriptedServer(per_connection(script, then=[serve(echo)])) as server:
        run(lambda: main(server))
        assert server.connections_accepted == 2
        assert len(server.requests) == 2  # the cancelled call was not sent again


def test_a_call_cancelled_while_waiting_to_retry_sends_nothing_more() -> None:
    """A GET answered 503 with Retry-After: 5 is cancelled during the wait: no retry."""
    done = Done()
    busy = response(503, b"", {"Retry-After": "5"})

    async def main(server: ScriptedServer) -> None:
        async with dispatcher(done) as d:
            call = asyncio.create_task(d.apply(f"{server.url}/t", task_id="waits"))
            await until(server, lambda s: len(s.requests) == 1)
            await asyncio.sleep(0.2)  # the answer is in: the call sleeps before its retry
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert in_use(d) == 0
        assert done.task_ids == []

    with ScriptedServer([serve(lambda r: busy)]) as server:
        run(lambda: main(server))
        assert len(server.requests) == 1


def test_a_call_cancelled_while_waiting_for_a_pooled_connection() -> None:
    """pool_maxsize=1: the waiter is cancelled; the holder is unaffected, the pool intact."""
    done = Done()
    release = threading.Event()

    def answer(request: RawRequest) -> bytes:
        if request.target.startswith("/hold"):
            release.wait(WAIT)
        return response(200, envelope(request.target))

    async def main(server: ScriptedServer) -> None:
        async with dispatcher(done, pool_maxsize=1) as d:
            holder = asyncio.create_task(d.apply(f"{server.url}/hold", task_id="holder"))
            await until(server, lambda s: len(s.requests) == 1)
            waiter = asyncio.create_task(d.apply(f"{server.url}/wait", task_id="waiter"))
            await asyncio.sleep(0.1)  # the waiter is queued for the connection
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            release.set()
            assert await asyncio.wait_for(holder, WAIT) == "/hold"
            assert await d.call(f"{server.url}/after") == "/after"
            assert done.task_ids[:1] == ["holder"]
            assert "waiter" not in done.task_ids
            assert in_use(d) == 0

    with ScriptedServer([serve(answer)]) as server:
        run(lambda: main(server))
        assert [r.target for r in server.requests] == ["/hold", "/after"]
        assert server.connections_accepted == 1


def test_cancelling_map_cancels_every_call_in_flight() -> None:
    done = Done()

    async def main(server: ScriptedServer) -> None:
        async with dispatcher(done, pool_maxsize=3) as d:
            calls = [{"n": n} for n in range(6)]
            before = asyncio.all_tasks()
            mapping = asyncio.create_task(d.map(f"{server.url}/t", calls, "POST"))
            await until(server, lambda s: len(s.requests) == 3)  # the window is full
            mapping.cancel()
            with pytest.raises(asyncio.CancelledError):
                await mapping
            await until(server, lambda s: s.peer_closed == 3)  # all three dropped
            assert in_use(d) == 0
            await asyncio.sleep(0.2)
            assert len(server.requests) == 3  # no call started after the cancel
            assert done.task_ids == []
            assert asyncio.all_tasks() == before  # no task left behind
            # the dispatcher is still good
            assert await d.call(f"{server.url}/t", "POST", n=9) == "n=9"
            assert in_use(d) == 0

    script = per_connection(silent, silent, silent, then=[serve(echo)])
    with ScriptedServer(script) as server:
        run(lambda: main(server))
        assert sorted(r.body for r in server.requests[:3]) == [b"n=0", b"n=1", b"n=2"]
        assert server.connections_accepted == 4


def test_a_timeout_around_a_call_is_a_cancellation_too() -> None:
    """``asyncio.wait_for`` (or ``asyncio.timeout``) around a call cancels it: the same
    guarantees, and the caller sees the TimeoutError of its own bound."""
    done = Done()

    async def main(server: ScriptedServer) -> None:
        async with dispatcher(done, timeout=30) as d:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(d.call(f"{server.url}/t", "POST", x=1), 0.3)
            await until(server, lambda s: s.peer_closed == 1)
            assert in_use(d) == 0
            assert await d.call(f"{server.url}/t", "POST", x=2) == "x=2"
            assert len(done.task_ids) == 1

    with ScriptedServer(per_connection(silent, then=[serve(echo)])) as server:
        run(lambda: main(server))
        assert server.connections_accepted == 2
