"""The AsyncDispatcher's short paths give what the long ones give.

``map`` builds its requests with :meth:`Pipeline.builder` (what the calls
share prepared once, task ids from :class:`TaskIds`), runs a window of
workers instead of a task per call, and hands the retry machinery only the
calls whose first attempt failed; ``Pipeline.retval`` reads the built-in
codec's success envelope without making an ``Envelope``; the aiohttp
transport sends in one step when there is no proxy, egress policy or redirect
to follow, and keeps the URLs it parsed. Each is held here to the path it
shortens: the same requests, retvals, errors, records and hook calls.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import gzip
import itertools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import pytest

from dispatchkit import (
    AsyncDispatcher,
    Attempt,
    Call,
    Dispatcher,
    DispatchError,
    HTTPStatusError,
    Outcome,
    RemoteExecuteError,
    Request,
    Response,
    _pipeline,
    hookimpl,
)
from dispatchkit._encoding import SENT_AS_IS
from dispatchkit._pipeline import TaskIds
from dispatchkit.builtin import async_transport
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


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout=60)

    return asyncio.run(bounded())


# -- Pipeline.builder against Pipeline.build ----------------------------------------------


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


VALUES: list[object] = [
    0, 7, -12, 10**30, True, False, None, 1.5, -0.0, 1e20, 1e-7, float("nan"), float("inf"),
    "", "abc", "a b", "x&y=z", "é ü", "snow☃", "a+b", "~-._", "\ud800", Text("t"), Color.RED,
    [1, "two", None], (3, 4), [], {"nested": 1}, b"bytes", object(),
]  # fmt: skip
NAMES: list[object] = ["x", "a b", "é", "", "k&=", 5, Text("n")]


def argument_sets() -> Iterator[Mapping[str, Any]]:
    yield {}
    for value in VALUES:
        yield {"v": value}
    for name in NAMES:
        yield {name: 1}  # type: ignore[dict-item]
    for first, second in itertools.combinations(VALUES[:16], 2):
        yield {"a": first, "b": second}
    yield {"x": 10**5000}  # too long for str(): refused as build refuses it
    yield {"x": 1, "y": None, "z": "q"}


def outcome(make: Callable[[], Request]) -> tuple[Any, ...]:
    """What building gave, the random task id left out (it is in a refusal's message too)."""
    try:
        request = make()
    except Exception as exc:  # any error must be the same one
        message = str(exc)
        if isinstance(exc, DispatchError) and exc.task_id:
            message = message.replace(exc.task_id, "<id>")
        return ("error", type(exc), message)
    headers = dict(request.headers)
    task_id = headers.pop("Idempotency-Key")
    assert task_id == request.task_id
    assert uuid.UUID(task_id).version == 4
    assert uuid.UUID(task_id).hex == task_id
    return (
        request.method,
        request.url,
        request.kwargs,
        list(request.headers),  # the order they go out in
        headers,
        request.body,
        request.timeout,
        dict(request.options),
        request.attempt,
        request.attempts,
    )


@pytest.mark.parametrize("settings", [{}, {"keep_alive": False, "timeout": 2.5}])
@pytest.mark.parametrize(
    ("url", "method"),
    [
        ("http://h.test/t", "GET"),
        ("http://h.test/t", "post"),
        ("http://h.test/t", "DELETE"),
        ("http://h.test/t?a=1&x=old", "GET"),
        ("http://h.test/t#frag", "HEAD"),
        ("http://h.test/t?q=1", "PUT"),
    ],
)
def test_the_builder_makes_the_request_build_makes(
    url: str, method: str, settings: dict[str, Any]
) -> None:
    with Dispatcher(**settings) as d:
        pipeline = d._pipeline
        for options in (None, {"signing_key": "acme"}):
            make = pipeline.builder(url, method, options)
            for kwargs in argument_sets():
                call = Call(url, method, kwargs, options=options)
                built = outcome(functools.partial(pipeline.build, call))
                assert outcome(functools.partial(make, kwargs)) == built, kwargs


@pytest.mark.parametrize(
    ("url", "method", "options"),
    [
        (b"http://h.test/t", "GET", None),  # not a str
        ("http://h.test/t", "BREW", None),
        ("http://h.test/t", 7, None),
        ("http://h.test/t", "GET", {"Bad Name": "x"}),
        ("http://h.test/t", "GET", {"signing_key": "whsec_c2VjcmV0"}),
        ("http://h.test/t", "GET", ["not", "a", "mapping"]),
    ],
)
def test_the_builder_refuses_what_build_refuses(url: Any, method: Any, options: Any) -> None:
    with Dispatcher() as d:
        pipeline = d._pipeline
        make = pipeline.builder(url, method, options)
        for kwargs in ({}, {"x": 1}):
            call = Call(url, method, kwargs, options=options)
            built = outcome(functools.partial(pipeline.build, call))
            assert built[0] == "error"
            assert outcome(functools.partial(make, kwargs)) == built


def test_the_builder_gives_every_request_its_own_headers_and_id() -> None:
    with Dispatcher() as d:
        make = d._pipeline.builder("http://h.test/t", "POST", {"signing_key": "k"})
        first, second = make({"x": 1}), make({"x": 1})
    assert first.headers is not second.headers
    first.headers["X-Plugin"] = "edited"  # a prepare_request hook edits its own request
    assert "X-Plugin" not in second.headers
    assert first.task_id != second.task_id


# -- TaskIds -------------------------------------------------------------------------------


def test_task_ids_are_uuid4_hex_and_unique() -> None:
    ids = TaskIds()
    seen = [ids() for _ in range(TaskIds.COUNT * 5 + 3)]
    assert len(set(seen)) == len(seen)
    for task_id in seen:
        parsed = uuid.UUID(task_id)
        assert parsed.hex == task_id
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_task_ids_read_again_after_a_fork() -> None:
    ids = TaskIds()
    ids()
    left = {ids._hex[at : at + 32] for at in range(ids._at, len(ids._hex), 32)}
    _pipeline._forked()  # what os.register_at_fork runs in a child
    assert ids() not in left


def test_a_forked_child_makes_other_task_ids_than_its_parent() -> None:
    code = (
        "import os\n"
        "from dispatchkit._pipeline import TaskIds\n"
        "ids = TaskIds()\n"
        "ids()\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.write(w, ' '.join(ids() for _ in range(5)).encode())\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "os.waitpid(pid, 0)\n"
        "child = os.read(r, 4096).decode().split()\n"
        "parent = [ids() for _ in range(5)]\n"
        "print(len(child), len(set(child) & set(parent)))\n"
    )
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["5", "0"]


# -- Pipeline.retval's reading of the JSON envelope ---------------------------------------


BODIES: list[tuple[bytes, str | None]] = [
    (b'{"status": "success", "retval": 100}', "application/json"),
    (b'{"status": "success", "retval": {"a": [1, 2.5, null]}}', "application/json"),
    (b'{"status": "success"}', "application/json"),
    (b'{"status": "success", "retval": null}', "text/html; charset=utf-8"),
    (b'{"status": "success", "retval": 1}', None),
    (b'{"status": "success", "retval": 1}', "application/vnd.acme+json"),
    (b'{"status": "failure", "reason": "disk full"}', "application/json"),
    (b'{"status": "failure"}', "application/json"),
    (b'{"status": "SUCCESS", "retval": 1}', "application/json"),
    (b'{"status": 1}', "application/json"),
    (b'{"retval": 1}', "application/json"),
    (b'["status", "success"]', "application/json"),
    (b'"success"', "application/json"),
    (b"{not json", "application/json"),
    (b"", "application/json"),
    (b'{"status": "success", "retval": 1}', "application/xml"),
]


@pytest.mark.parametrize(("body", "content_type"), BODIES)
def test_retval_reads_what_the_reader_reads(body: bytes, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    with Dispatcher() as d:
        pipeline = d._pipeline
        request = pipeline.build(Call("http://h.test/t"))
        answer = Response(200, headers, body)

        def read(how: Callable[[Request, Response], Any]) -> tuple[Any, ...]:
            try:
                return ("retval", how(request, answer))
            except DispatchError as exc:
                return ("error", type(exc), str(exc), getattr(exc, "status", None))

        assert read(pipeline.retval) == read(pipeline.reader.retval)


# -- map's workers, first attempts and retries ---------------------------------------------


class Hooks:
    """Every per-call hook, recorded."""

    def __init__(self) -> None:
        self.prepared: list[tuple[str, int]] = []
        self.attempts: list[tuple[str, int, str]] = []
        self.done: list[tuple[str, Any, str | None, int]] = []

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self.prepared.append((request.task_id, request.attempt))
        request.headers["X-Attempt"] = str(request.attempt)

    @hookimpl
    def dispatchkit_attempt_done(self, request: Request, attempt: Attempt) -> None:
        self.attempts.append((request.task_id, attempt.number, attempt.outcome))

    @hookimpl
    def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
        error = None if outcome.ok else type(outcome.error).__name__
        self.done.append((request.task_id, outcome.retval, error, outcome.attempts))


def flaky(request: RawRequest) -> bytes:
    """``/t?n=N``: a 503 to the first attempt of every third call, then the echo of N;
    ``fail=1`` always answers a failure envelope."""
    query = dict(part.split("=") for part in request.target.partition("?")[2].split("&"))
    if query.get("fail"):
        return response(200, json.dumps({"status": "failure", "reason": "no"}).encode())
    if int(query["n"]) % 3 == 0 and request.headers.get("x-attempt", "1") == "1":
        return response(503, b"busy")
    return response(200, envelope(int(query["n"])))


@pytest.mark.parametrize("concurrency", [1, 4, 64])
def test_map_gives_what_call_gives_and_every_hook_fires(concurrency: int) -> None:
    """First attempts that succeed skip the retry machinery, the others go through it:
    the retvals, attempts and hook calls are what one ``call`` per argument gives."""
    calls = [{"n": n} for n in range(30)] + [{"n": 99, "fail": 1}]

    async def main(url: str, how: str) -> tuple[list[Any], Hooks]:
        hooks = Hooks()
        async with AsyncDispatcher(plugins=[hooks], retry_backoff=0.001, timeout=5) as d:
            if how == "map":
                values = await d.map(url, calls, concurrency=concurrency, return_exceptions=True)
            else:
                values = []
                for kwargs in calls:
                    try:
                        values.append(await d.apply(url, "GET", kwargs))
                    except RemoteExecuteError as exc:
                        values.append(exc)
        return values, hooks

    with ScriptedServer(serve(flaky)) as server:
        mapped, by_map = run(lambda: main(f"{server.url}/t", "map"))
        called, by_call = run(lambda: main(f"{server.url}/t", "call"))

    def shown(values: list[Any]) -> list[Any]:
        return [type(v).__name__ if isinstance(v, BaseException) else v for v in values]

    assert shown(mapped) == shown(called) == [*range(30), "RemoteExecuteError"]

    def per_call(hooks: Hooks) -> list[tuple[Any, ...]]:
        order = {task_id: i for i, (task_id, *_) in enumerate(hooks.done)}
        rows = []
        for task_id, retval, error, attempts in hooks.done:
            prepared = [n for t, n in hooks.prepared if t == task_id]
            recorded = [(n, o) for t, n, o in hooks.attempts if t == task_id]
            rows.append((retval, error, attempts, prepared, recorded))
        assert len(order) == len(calls)  # one call_done per call, each with its own id
        return sorted(rows, key=repr)

    assert per_call(by_map) == per_call(by_call)
    retried = [row for row in per_call(by_map) if row[2] == 2]
    assert len(retried) == 10  # every third call: a 503, then its retval
    assert all(row[4] == [(1, "503"), (2, "200")] for row in retried)


def test_map_without_retries_raises_the_first_failure() -> None:
    async def main(url: str) -> None:
        async with AsyncDispatcher(retry_attempts=1, timeout=5) as d:
            with pytest.raises(HTTPStatusError) as info:
                await d.map(url, [{"n": 1}, {"n": 3}, {"n": 4}], concurrency=3)
            assert info.value.status == 503

    with ScriptedServer(serve(flaky)) as server:
        run(lambda: main(f"{server.url}/t"))


def test_map_stops_and_cancels_when_taking_the_next_call_fails() -> None:
    """A generator of arguments that raises: the calls in flight are cancelled, the
    error propagates, no task is left behind and the dispatcher still works."""

    def arguments() -> Iterator[dict[str, int]]:
        yield {"n": 1}
        yield {"n": 2}
        raise LookupError("no more")

    async def main(url: str) -> None:
        async with AsyncDispatcher(timeout=5) as d:
            before = asyncio.all_tasks()
            with pytest.raises(LookupError, match="no more"):
                await d.map(url, arguments(), concurrency=4)
            assert asyncio.all_tasks() == before
            assert await d.map(url, [{"n": 4}, {"n": 5}]) == [4, 5]

    with ScriptedServer(serve(flaky)) as server:
        run(lambda: main(f"{server.url}/t"))


@pytest.mark.parametrize("calls", [[], [{"n": 1}], [{"n": n} for n in range(1, 30) if n % 3]])
def test_map_of_a_short_collection(calls: list[dict[str, int]]) -> None:
    async def main(url: str) -> list[Any]:
        async with AsyncDispatcher(timeout=5) as d:
            return await d.map(url, calls, concurrency=64)

    with ScriptedServer(serve(flaky)) as server:
        assert run(lambda: main(f"{server.url}/t")) == [c["n"] for c in calls]


def test_map_of_a_bad_url_fails_each_call_as_call_does() -> None:
    async def main() -> None:
        done = Hooks()
        async with AsyncDispatcher(plugins=[done], timeout=5) as d:
            calls = [{"n": 1}, {"n": 2}]
            values = await d.map("ftp://h.test/t", calls, return_exceptions=True)
            errors = []
            for kwargs in calls:
                with pytest.raises(DispatchError) as info:
                    await d.apply("ftp://h.test/t", "GET", kwargs)
                errors.append(info.value)

        def shown(errors: list[Any]) -> list[tuple[type, str]]:
            return [(type(e), str(e).replace(e.task_id or "", "")) for e in errors]

        assert shown(values) == shown(errors)
        assert len(done.done) == 4

    run(main)


# -- the transport's one-step send and its URLs -------------------------------------------


def answers(request: RawRequest) -> bytes:
    """An answer per path: what the short and the long send must read alike."""
    path = request.target.partition("?")[0]
    big = json.dumps({"status": "success", "retval": "x" * 5000}).encode()
    if path == "/ok":
        return response(200, envelope("ok"))
    if path == "/gzip":
        return response(200, gzip.compress(envelope("zipped")), {"Content-Encoding": "gzip"})
    if path == "/big":
        return response(200, big)
    if path == "/big-chunked":
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
        return response(200, chunked, {"Transfer-Encoding": "chunked"})
    if path == "/chain":
        return response(200, envelope("x"), {"Content-Encoding": "gzip, br"})
    if path == "/upgrade":
        return response(101, b"", content_type=None, content_length=0)
    if path == "/redirect":
        return response(302, b"", {"Location": "/ok"})
    if path == "/failure":
        return response(500, json.dumps({"status": "failure", "reason": "boom"}).encode())
    return response(404, b"no such task")


PATHS = ["/ok", "/gzip", "/big", "/big-chunked", "/chain", "/upgrade", "/redirect", "/failure"]


def test_the_one_step_send_reads_answers_as_the_loop_does() -> None:
    async def main(base: str, settings: dict[str, Any]) -> list[tuple[Any, ...]]:
        seen: list[tuple[Any, ...]] = []
        async with AsyncDispatcher(
            timeout=5, retry_attempts=1, max_response_bytes=4096, **settings
        ) as d:
            transport = d._transports["http"]
            assert isinstance(transport, async_transport.AiohttpTransport)
            assert transport._direct is (settings == {})
            for path in PATHS:
                try:
                    seen.append(("retval", await d.call(f"{base}{path}", x=1)))
                except DispatchError as exc:
                    message = str(exc).replace(exc.task_id or "", "")
                    status = getattr(exc, "status", None)
                    transient = getattr(exc, "transient", None)
                    seen.append(("error", type(exc), message, status, transient))
        return seen

    with ScriptedServer(serve(answers)) as server:
        short = run(lambda: main(server.url, {}))
        # the long path (a redirect may be followed), given no redirect to follow
        server_long = run(lambda: main(server.url, {"follow_redirects": 1}))
    assert short[:6] == server_long[:6]
    assert short[7] == server_long[7]
    assert short[0] == ("retval", "ok")
    assert short[1] == ("retval", "zipped")
    assert short[6][1].__name__ == "HTTPStatusError"  # not followed on the short path
    assert server_long[6] == ("retval", "ok")  # followed on the long one


def test_the_transport_keeps_the_urls_it_parsed_and_sends_them_unchanged() -> None:
    async def main(base: str) -> None:
        async with AsyncDispatcher(timeout=5) as d:
            transport = d._transports["http"]
            assert isinstance(transport, async_transport.AiohttpTransport)
            targets = [f"{base}/ok?x=a%2Fb", f"{base}/ok?x=a b", f"{base}/ok?x=%7e"]
            for target in targets:
                first = transport._url(target)
                assert transport._url(target) is first  # parsed once
                fresh = transport._aiohttp.client.URL(
                    target, encoded=bool(SENT_AS_IS.fullmatch(target[7:]))
                )
                assert first == fresh
                assert str(first) == str(fresh)
            for n in range(async_transport._URLS_KEPT * 2 + 5):
                transport._url(f"{base}/ok?n={n}")
                assert len(transport._urls) <= async_transport._URLS_KEPT

    with ScriptedServer(serve(answers)) as server:
        run(lambda: main(server.url))


def silent(conn: Connection) -> None:
    """Read the request, answer nothing, wait until the client hangs up."""
    if conn.read_request() is not None:
        conn.wait_for_close()


def echo(request: RawRequest) -> bytes:
    return response(200, envelope(request.target))


@pytest.mark.parametrize("settings", [{}, {"follow_redirects": 1}], ids=["one-step", "loop"])
def test_a_cancelled_send_drops_its_connection_on_either_path(settings: dict[str, Any]) -> None:
    done = Hooks()

    async def main(server: ScriptedServer) -> None:
        async with AsyncDispatcher(plugins=[done], timeout=5, **settings) as d:
            transport = d._transports["http"]
            assert isinstance(transport, async_transport.AiohttpTransport)
            assert transport._direct is (settings == {})
            call = asyncio.create_task(d.call(f"{server.url}/t", x=1))
            assert await asyncio.to_thread(server.wait_until, lambda s: len(s.requests) == 1, 5)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert await asyncio.to_thread(server.wait_until, lambda s: s.peer_closed == 1, 5)
            assert await d.call(f"{server.url}/t", x=2) == "/t?x=2"
        assert [retval for _, retval, _, _ in done.done] == ["/t?x=2"]

    with ScriptedServer(per_connection(silent, then=[serve(echo)])) as server:
        run(lambda: main(server))
        assert server.connections_accepted == 2
