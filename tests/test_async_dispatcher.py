"""The AsyncDispatcher against real servers: the Node.js peer and the project's own TaskApp.

Each test runs its coroutine with plain ``asyncio.run`` (no pytest plugin).
Calls, options, errors, retries, hooks, signing and ``map`` are held to what
the sync Dispatcher does (``tests/test_async.py``, ``tests/test_retry.py``);
the fault table shared by both drivers is ``tests/test_async_faults.py``,
cancellation is ``tests/test_async_cancel.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import pytest

from dispatchkit import (
    AsyncDispatcher,
    Call,
    Dispatcher,
    DispatchError,
    DispatchTimeout,
    EncodeError,
    HTTPStatusError,
    InvalidResponseError,
    Outcome,
    RemoteExecuteError,
    Request,
    UsageError,
    hookimpl,
)
from dispatchkit.server import TaskApp, TaskServer
from dispatchkit.signing import generate_secret
from support.probes import Attempts
from support.scripted_server import RawRequest, ScriptedServer, envelope, response, serve

T = TypeVar("T")
SECRET = generate_secret()
OTHER = generate_secret()
FORM = "application/x-www-form-urlencoded"


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` in a new event loop, bounded (pytest-timeout is the outer bound)."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout=60)

    return asyncio.run(bounded())


def dispatcher(**settings: Any) -> AsyncDispatcher:
    """An AsyncDispatcher with quick retries, as ``make_dispatcher`` builds sync ones."""
    settings.setdefault("timeout", 5)
    settings.setdefault("retry_backoff", 0.01)
    return AsyncDispatcher(**settings)


# -- a TaskApp of our own --------------------------------------------------------------


class Runs:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count: Counter[str] = Counter()

    def add(self, name: str) -> None:
        with self.lock:
            self.count[name] += 1


def task_app(runs: Runs, **options: Any) -> TaskApp:
    app = TaskApp(**options)

    @app.task
    def add(x: int, y: int) -> int:
        runs.add("add")
        return x + y

    @app.task
    def text(value: str) -> str:
        runs.add("text")
        return value

    @app.task
    def nap(seconds: float, fail: str = "") -> float:
        """Sleep, then fail with ``fail`` when given: for ordering and in-flight tests."""
        runs.add("nap")
        time.sleep(seconds)
        if fail:
            raise RuntimeError(fail)
        return seconds

    return app


@pytest.fixture(scope="module")
def runs() -> Runs:
    return Runs()


@pytest.fixture(scope="module")
def taskapp(runs: Runs) -> Iterator[TaskServer]:
    app = task_app(runs)
    with app.server(port=0) as server:
        yield server
    app.close()


# -- calls: arguments, options, answers (the Node peer) ----------------------------------


def test_get_query_post_form_and_post_json(peer: str) -> None:
    async def main() -> list[Any]:
        async with dispatcher() as d:
            return [
                await d.call(f"{peer}/echo", x=1, y="ü b"),
                await d.call(f"{peer}/echo", "POST", x=1, y="ü b"),
                await d.apply(f"{peer}/echo", "POST", {"x": 1, "y": [1, "ü"]}, json=True),
                await d.call(f"{peer}/multiply", x=6, y=7),
                await d.call(f"{peer}/multiply", "POST", x=6, y=7),
            ]

    get, form, json_, product_get, product_post = run(main)
    assert get["method"] == "GET"
    assert get["query"] == [["x", "1"], ["y", "ü b"]]
    assert get["body"] == ""
    assert form["method"] == "POST"
    assert form["query"] == []
    assert form["content_type"] == FORM
    assert form["args"] == {"x": "1", "y": "ü b"}
    assert json_["content_type"] == "application/json"
    assert json_["args"] == {"x": 1, "y": [1, "ü"]}
    assert (product_get, product_post) == (42, 42)


def test_task_id_headers_and_per_call_timeout(peer: str) -> None:
    async def main() -> None:
        async with dispatcher(timeout=1, retry_attempts=1) as d:
            echo = await d.apply(
                f"{peer}/echo", "PUT", {"x": 1}, task_id="job-7", headers={"X-Tenant": "t1"}
            )
            headers = echo["headers"]
            assert headers["idempotency-key"] == "job-7"
            assert headers["x-tenant"] == "t1"
            assert headers["user-agent"].startswith("dispatchkit/")
            # none of aiohttp's automatic headers: no Accept, no codings offered
            assert "accept" not in headers
            assert headers.get("accept-encoding", "identity") == "identity"
            assert await d.apply(f"{peer}/record", task_id="job-8") == "job-8"
            auto = await d.call(f"{peer}/record")
            assert re.fullmatch(r"[0-9a-f]{32}", auto)
            # the setting (1 s) is too short for this call; the per-call timeout is not
            assert await d.apply(f"{peer}/slow", kwargs={"delay": 1500}, timeout=5) == 1500
            with pytest.raises(DispatchTimeout) as info:
                await d.apply(f"{peer}/slow", kwargs={"delay": 700}, timeout=0.3)
            assert info.value.task_id is not None
            assert await d.execute(Call(f"{peer}/multiply", "POST", {"x": 2, "y": 5})) == 10

    run(main)


def test_errors_are_the_sync_ones(peer: str) -> None:
    async def main() -> None:
        async with dispatcher() as d:
            with pytest.raises(RemoteExecuteError) as failed:
                await d.apply(f"{peer}/fail", kwargs={"reason": "disk full"}, task_id="f-1")
            assert (failed.value.reason, failed.value.status) == ("disk full", 200)
            assert failed.value.task_id == "f-1"
            with pytest.raises(RemoteExecuteError) as failed500:
                await d.call(f"{peer}/fail500", reason="kaputt")
            assert (failed500.value.reason, failed500.value.status) == ("kaputt", 500)
            with pytest.raises(HTTPStatusError) as status:
                await d.call(f"{peer}/status/404")
            assert status.value.status == 404
            assert status.value.body_excerpt == b"nope 404"
            assert status.value.headers["content-type"].startswith("text/plain")
            with pytest.raises(InvalidResponseError):
                await d.call(f"{peer}/invalid/json")
            with pytest.raises(UsageError):
                await d.call(f"{peer}/multiply", "FETCH")

    run(main)


def test_taskapp_calls_and_task_failures(taskapp: TaskServer) -> None:
    async def main() -> None:
        async with dispatcher() as d:
            assert await d.call(f"{taskapp.url}/add", x=2, y=3) == 5
            assert await d.call(f"{taskapp.url}/add", "POST", x=2, y=3) == 5
            assert await d.apply(f"{taskapp.url}/add", "POST", {"x": 2, "y": 3}, json=True) == 5
            assert await d.call(f"{taskapp.url}/text", value="a b&c=ü/?#") == "a b&c=ü/?#"
            with pytest.raises(RemoteExecuteError) as info:
                await d.call(f"{taskapp.url}/nap", seconds=0, fail="disk full")
            assert info.value.reason == "RuntimeError: disk full"
            assert info.value.status == 500

    run(main)


@pytest.mark.parametrize(
    ("method", "kwargs", "json"),
    [("GET", {"x": "1"}, False), ("POST", {"x": "1"}, False), ("POST", {"x": 1}, True)],
    ids=["get", "post-form", "post-json"],
)
def test_the_same_request_goes_out_as_from_the_sync_driver(
    method: str, kwargs: dict[str, Any], json: bool
) -> None:
    """Request line, header names and values, body: byte for byte what the sync one sends
    (only the order of the headers may differ)."""

    def wire(server: ScriptedServer) -> tuple[str, str, list[tuple[str, str]], bytes]:
        (request,) = server.requests
        lines = request.head.decode("latin-1").split("\r\n")
        headers = sorted(
            (name.lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
            if name.lower() != "host"  # each driver talked to a server of its own
        )
        return request.method, request.target, headers, request.body

    seen = []
    for driver in ("sync", "async"):
        with ScriptedServer([serve()]) as server:
            url = f"{server.url}/t"
            if driver == "sync":
                with Dispatcher(retry_attempts=1) as sync:
                    sync.apply(url, method, kwargs, task_id="wire-1", json=json)
            else:

                async def main(url: str = url) -> None:
                    async with dispatcher(retry_attempts=1) as d:
                        await d.apply(url, method, kwargs, task_id="wire-1", json=json)

                run(main)
            seen.append(wire(server))
    sync_wire, async_wire = seen
    assert async_wire == sync_wire


# -- retries (the peer's /flaky and /record) ---------------------------------------------


def test_transient_statuses_are_retried_with_one_idempotency_key(peer: str) -> None:
    attempts = Attempts()

    async def main() -> tuple[Any, Any]:
        async with dispatcher(plugins=[attempts], retry_attempts=5) as d, dispatcher() as plain:
            await plain.call(f"{peer}/seen/reset")
            retval = await d.apply(f"{peer}/flaky", "GET", {"fail": 3}, task_id="async-42")
            return retval, await plain.call(f"{peer}/seen")

    retval, seen = run(main)
    assert retval == 4
    assert attempts.numbers == [1, 2, 3, 4]
    assert attempts.keys == {"async-42"}
    assert seen == {"async-42": 4}


def test_post_is_not_retried_on_503_and_attempts_are_bounded(peer: str) -> None:
    post, get = Attempts(), Attempts()

    async def main() -> None:
        async with dispatcher(plugins=[post]) as d:
            with pytest.raises(HTTPStatusError) as info:
                await d.call(f"{peer}/flaky", "POST", fail=1, code=503)
            assert info.value.status == 503
        async with dispatcher(plugins=[get], retry_attempts=3) as d:
            with pytest.raises(HTTPStatusError):
                await d.call(f"{peer}/flaky", fail=10)

    run(main)
    assert post.numbers == [1]
    assert get.numbers == [1, 2, 3]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_timeout_is_retried_for_get_and_not_for_post(peer: str, method: str) -> None:
    """The peer counts each arrival of the key; the answer comes after the client gave up."""
    key = f"timeout-{method}"

    async def main() -> dict[str, int]:
        async with dispatcher(retry_attempts=2) as d:
            await d.call(f"{peer}/seen/reset")
            with pytest.raises(DispatchTimeout):
                await d.apply(f"{peer}/record", method, {"delay": 3000}, task_id=key, timeout=0.3)
            seen: dict[str, int] = await d.call(f"{peer}/seen")
            return seen

    assert run(main) == {key: 2 if method == "GET" else 1}


def test_retry_after_is_honoured(peer: str) -> None:
    attempts = Attempts()

    async def main() -> Any:
        async with dispatcher(plugins=[attempts]) as d:
            return await d.call(f"{peer}/flaky", fail=1, code=503, retry_after=1)

    assert run(main) == 2
    assert attempts.numbers == [1, 2]
    assert attempts.gap(1) >= 0.9  # a lower bound only: the wait asked for was taken


def test_retry_after_beyond_the_time_budget_stops_retrying(peer: str) -> None:
    attempts = Attempts()

    async def main() -> None:
        async with dispatcher(plugins=[attempts], retry_after_cap=60, retry_max_time=1) as d:
            with pytest.raises(HTTPStatusError) as info:
                await d.call(f"{peer}/flaky", fail=1, code=503, retry_after=30)
            assert info.value.status == 503

    run(main)
    assert attempts.numbers == [1]


# -- the hooks see what they see under the sync driver ----------------------------------------


class Recorder:
    """Snapshots of what prepare_request and call_done receive (timing left out)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.prepared: list[Request] = []
        self.done: list[Request] = []

    @staticmethod
    def snapshot(request: Request) -> dict[str, Any]:
        headers = dict(request.headers)
        return {
            "method": request.method,
            "url": request.url,
            "kwargs": dict(request.kwargs),
            "headers": headers,
            "body": request.body,
            "task_id": request.task_id,
            "timeout": request.timeout,
            "attempt": request.attempt,
        }

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self.prepared.append(request)
        self.events.append(("prepare", self.snapshot(request)))

    @hookimpl
    def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
        self.done.append(request)
        error = outcome.error
        shown = {
            "retval": outcome.retval,
            "error": None if error is None else (type(error).__name__, str(error)),
            "attempts": outcome.attempts,
            "ok": outcome.ok,
        }
        self.events.append(("done", {**self.snapshot(request), **shown}))


def _scripted_calls(peer: str) -> list[Call]:
    return [
        Call(f"{peer}/multiply", "GET", {"x": 3, "y": 4}, "h-get"),
        Call(f"{peer}/multiply", "POST", {"x": 3, "y": 4}, "h-post", 2.5, {"X-Trace": "1"}),
        Call(f"{peer}/multiply", "PATCH", {"x": 2, "y": 3}, "h-json", None, None, True),
        Call(f"{peer}/fail", "GET", {"reason": "nope"}, "h-fail"),
        Call(f"{peer}/flaky", "GET", {"fail": 1}, "h-flaky"),
        Call(f"{peer}/status/404", "DELETE", {}, "h-404"),
    ]


def test_prepare_request_and_call_done_see_what_the_sync_driver_shows(peer: str) -> None:
    """The same calls through both drivers: the hooks receive equal Requests and Outcomes."""
    settings: dict[str, Any] = {"timeout": 5, "retry_backoff": 0.01}
    calls = _scripted_calls(peer)

    def reset_seen() -> None:
        with Dispatcher(**settings) as plain:
            plain.call(f"{peer}/seen/reset")

    sync = Recorder()
    reset_seen()
    with Dispatcher(plugins=[sync], **settings) as d:
        for c in calls:
            with contextlib.suppress(DispatchError):
                d.execute(c)

    asynchronous = Recorder()
    reset_seen()

    async def main() -> None:
        async with AsyncDispatcher(plugins=[asynchronous], **settings) as d:
            for c in calls:
                with contextlib.suppress(DispatchError):
                    await d.execute(c)

    run(main)
    assert asynchronous.events == sync.events
    assert [kind for kind, _ in sync.events].count("done") == len(calls)
    # call_done gets the very Request object the attempts were prepared with
    for recorder in (sync, asynchronous):
        assert all(any(r is p for p in recorder.prepared) for r in recorder.done)


# -- signing --------------------------------------------------------------------------


@pytest.fixture
def signed_app() -> Iterator[tuple[TaskServer, Runs]]:
    runs = Runs()
    app = task_app(runs, signing_secret=SECRET)
    with app.server(port=0) as server:
        yield server, runs
    app.close()


def test_signed_calls_are_verified_by_a_signing_taskapp(
    signed_app: tuple[TaskServer, Runs],
) -> None:
    server, runs = signed_app

    async def main() -> None:
        async with dispatcher(signing_secret=SECRET) as d:
            assert "signing" in [p.name for p in d.plugins]
            assert await d.call(f"{server.url}/add", x=2, y=3) == 5
            assert await d.call(f"{server.url}/add", "POST", x=2, y=3) == 5
            assert await d.apply(f"{server.url}/add", "POST", {"x": 2, "y": 3}, json=True) == 5
            # a query that must be percent-encoded: signed as sent, so sent as signed
            assert await d.call(f"{server.url}/text", value="a b&c=ü/?") == "a b&c=ü/?"
        async with dispatcher(signing_secret=OTHER) as wrong, dispatcher() as unsigned:
            for d in (wrong, unsigned):
                with pytest.raises(RemoteExecuteError) as info:
                    await d.call(f"{server.url}/add", x=1, y=1)
                assert info.value.status == 401

    run(main)
    assert runs.count == Counter({"add": 3, "text": 1})  # the refused ones did not run


# -- map ---------------------------------------------------------------------------------


def test_map_returns_results_in_order(peer: str) -> None:
    async def main() -> list[Any]:
        async with dispatcher() as d:
            return await d.map(f"{peer}/multiply", ({"x": i, "y": 2} for i in range(300)))

    assert run(main) == [2 * i for i in range(300)]


class InFlight:
    """The most calls in flight at once, seen by the hooks (first attempt to call_done)."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self.started: set[str] = set()

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        if request.attempt == 1:
            self.now += 1
            self.peak = max(self.peak, self.now)

    @hookimpl
    def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
        self.now -= 1


@pytest.mark.parametrize(
    ("pool_maxsize", "concurrency"),
    [(16, 3), (3, None), (3, 12)],
    ids=["window", "default", "pool"],
)
def test_map_concurrency_and_connections_are_bounded(
    peer: str, pool_maxsize: int, concurrency: int | None
) -> None:
    """At most ``concurrency`` calls (default ``pool_maxsize``) in flight, and never more
    than ``pool_maxsize`` connections to the host, whatever the window."""
    probe = InFlight()

    async def main() -> tuple[list[Any], dict[str, int]]:
        async with dispatcher(plugins=[probe], pool_maxsize=pool_maxsize) as d:
            await d.call(f"{peer}/stats/reset")
            values = await d.map(f"{peer}/slow", [{"delay": 20}] * 40, concurrency=concurrency)
            stats: dict[str, int] = await d.call(f"{peer}/stats")
            return values, stats

    values, stats = run(main)
    assert values == [20] * 40
    window = concurrency or pool_maxsize
    assert 1 <= probe.peak <= window
    assert stats["requests"] == 41
    assert stats["connections"] <= min(window, pool_maxsize)


def test_map_raises_the_first_error_and_stops(peer: str) -> None:
    calls: list[Mapping[str, object]] = [
        {"x": 1, "y": 1},
        {"x": "one", "y": 1},
        *({"x": i, "y": 1} for i in range(500)),
    ]

    async def main() -> dict[str, int]:
        async with dispatcher() as d:
            await d.call(f"{peer}/stats/reset")
            with pytest.raises(RemoteExecuteError, match="one"):
                await d.map(f"{peer}/multiply", calls, concurrency=2)
            stats: dict[str, int] = await d.call(f"{peer}/stats")
            return stats

    # At most the window after the failure was in flight: the other ~500 never started.
    assert run(main)["requests"] <= 1 + 2 + 2 + 1


def test_map_raises_the_first_error_in_order_after_the_calls_in_flight(
    taskapp: TaskServer,
) -> None:
    """The error of the earliest call wins, though a later one failed first; and the call
    still in flight when the first error came finished before map raised."""
    probe = InFlight()
    done: list[tuple[Any, str | None]] = []

    class Done:
        @hookimpl
        def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
            done.append((outcome.retval, None if outcome.ok else str(outcome.error)))

    calls: list[Mapping[str, object]] = [
        {"seconds": 0.0},
        {"seconds": 0.4, "fail": "first"},
        {"seconds": 0.0, "fail": "second"},
        {"seconds": 0.6},
    ]

    async def main() -> None:
        async with dispatcher(plugins=[probe, Done()], retry_attempts=1) as d:
            with pytest.raises(RemoteExecuteError) as info:
                await d.map(f"{taskapp.url}/nap", calls, concurrency=4)
            assert info.value.reason == "RuntimeError: first"
            assert probe.now == 0  # nothing left in flight
            assert (0.6, None) in done  # the slow call finished first
            values = await d.map(f"{taskapp.url}/nap", calls, return_exceptions=True)
            assert values[0] == 0.0
            assert values[3] == 0.6
            assert [e.reason for e in values[1:3] if isinstance(e, RemoteExecuteError)] == [
                "RuntimeError: first",
                "RuntimeError: second",
            ]

    run(main)


def test_map_edge_cases(peer: str) -> None:
    async def main() -> None:
        async with dispatcher() as d:
            assert await d.map(f"{peer}/multiply", []) == []
            with pytest.raises(UsageError, match="concurrency"):
                await d.map(f"{peer}/multiply", [{"x": 1, "y": 1}], concurrency=-1)
            with pytest.raises(EncodeError):  # refused when encoding: nothing was sent
                await d.map(f"{peer}/multiply", [{"x": {"no": "dicts"}}])

    run(main)


# -- a pool that runs dry ---------------------------------------------------------------


def test_a_pool_wait_that_times_out_does_not_break_the_holder() -> None:
    """pool_maxsize=1: a call that gives up waiting for the connection leaves the holder
    and the pool intact (tests/test_hostile.py's case for the sync transport)."""
    release = threading.Event()

    def answer(request: RawRequest) -> bytes:
        if request.target.startswith("/slow"):
            release.wait(5)
        return response(200, envelope(request.target))

    async def main(server: ScriptedServer) -> None:
        async with dispatcher(pool_maxsize=1, retry_attempts=1) as d:
            holder = asyncio.create_task(d.call(f"{server.url}/slow"))
            arrived = await asyncio.to_thread(server.wait_until, lambda s: len(s.requests) == 1, 5)
            assert arrived
            # docs/async.md: unlike the sync driver's, this wait is bounded by the attempt's
            # deadline (six times the call's timeout), not by the timeout itself
            with pytest.raises(DispatchTimeout, match="deadline"):
                await d.apply(f"{server.url}/waiter", timeout=0.2)
            assert not holder.done()
            release.set()
            assert await asyncio.wait_for(holder, 10) == "/slow"
            values = await asyncio.gather(*(d.call(f"{server.url}/q{n}") for n in range(8)))
            assert values == [f"/q{n}" for n in range(8)]

    with ScriptedServer([serve(answer)]) as server:
        run(lambda: main(server))
        assert server.connections_accepted == 1
        assert [r.target for r in server.requests if r.target == "/waiter"] == []


# -- building, closing, loops --------------------------------------------------------------


def test_without_aiohttp_the_error_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['aiohttp'] = None  # import aiohttp now raises ImportError\n"
        "import dispatchkit\n"
        "with dispatchkit.Dispatcher() as d:\n"
        "    pass  # the sync side does not need it\n"
        "try:\n"
        "    dispatchkit.AsyncDispatcher()\n"
        "except dispatchkit.UsageError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout, done.stdout + done.stderr
    assert "dispatchkit[async]" in done.stdout


def test_an_unknown_setting_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="timeuot"):
        AsyncDispatcher(timeuot=3)
    with pytest.raises(UsageError, match="timeout"):
        AsyncDispatcher(timeout=-1)


def test_a_closed_dispatcher_refuses_calls(peer: str) -> None:
    async def main() -> None:
        d = dispatcher()
        async with d as entered:
            assert entered is d
            assert await d.call(f"{peer}/multiply", x=1, y=1) == 1
        assert "closed" in repr(d)
        with pytest.raises(UsageError, match="closed"):
            await d.call(f"{peer}/multiply", x=1, y=1)
        with pytest.raises(UsageError, match="closed"):
            await d.map(f"{peer}/multiply", [{"x": 1, "y": 1}])
        await d.aclose()  # twice is fine

    run(main)


def test_a_second_event_loop_is_a_usage_error(peer: str) -> None:
    d = dispatcher()
    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(d.call(f"{peer}/multiply", x=2, y=2)) == 4

        async def elsewhere() -> Any:
            return await d.call(f"{peer}/multiply", x=3, y=3)

        with pytest.raises(UsageError, match="event loop"):
            asyncio.run(elsewhere())
        # the first loop still has it, and closes it
        assert first.run_until_complete(d.call(f"{peer}/multiply", x=5, y=5)) == 25
        first.run_until_complete(d.aclose())
    finally:
        first.close()


def test_one_dispatcher_many_tasks_one_pool(taskapp: TaskServer) -> None:
    """200 concurrent calls from 200 tasks, pool_maxsize=4: every answer its own,
    at most 4 connections to the host."""
    taskapp.stats.reset()

    async def main() -> list[Any]:
        async with dispatcher(pool_maxsize=4) as d:
            return await asyncio.gather(
                *(d.call(f"{taskapp.url}/add", "POST", x=i, y=1) for i in range(200))
            )

    assert run(main) == [i + 1 for i in range(200)]
    assert taskapp.stats.connections_opened <= 4
