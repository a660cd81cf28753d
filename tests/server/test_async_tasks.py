"""Async tasks under WSGI: awaited on the app's own event loop thread.

Calls go over the embedded TaskServer on 127.0.0.1 with a real Dispatcher, or
straight into the WSGI callable. Every wait is bounded (TIMEOUT); nothing
asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asgi_app
import pytest

from dispatchkit import Dispatcher, RemoteExecuteError
from dispatchkit.server import TaskApp, TaskServer, _loop

TIMEOUT = 10.0
POLL = 0.01
LOOP_THREAD = "dispatchkit-taskapp-loop"


@pytest.fixture
def app() -> Iterator[TaskApp]:
    made = asgi_app.make_app()
    yield made
    made.close()


@pytest.fixture
def server(app: TaskApp) -> Iterator[TaskServer]:
    with app.server(port=0) as running:
        yield running


def wsgi_get(app: TaskApp, path: str, query: str = "") -> tuple[int, Any]:
    """Call the WSGI app directly, with no server."""
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
    }
    statuses: list[str] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
    ) -> Callable[[bytes], object]:
        statuses.append(status)
        return lambda data: None

    body = b"".join(app(environ, start_response))
    return int(statuses[0].split()[0]), json.loads(body)


def loop_thread(app: TaskApp) -> threading.Thread | None:
    thread = app._loop._thread
    return thread if thread is not None and thread.is_alive() else None


def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {TIMEOUT} s")
        time.sleep(POLL)


def test_async_tasks_over_the_embedded_server(
    app: TaskApp, server: TaskServer, dispatcher: Dispatcher
) -> None:
    url = server.url
    with pytest.raises(RemoteExecuteError) as error:
        dispatcher.call(f"{url}/amultiply", x="six", y=1)
    assert (error.value.status, error.value.reason) == (400, "argument 'x': invalid int 'six'")
    assert loop_thread(app) is None  # refused before anything ran: no loop yet
    assert dispatcher.call(f"{url}/amultiply", x=6, y=7) == 42
    assert dispatcher.call(f"{url}/amultiply", "POST", x=6, y=7) == 42
    assert dispatcher.apply(f"{url}/total", "POST", {"xs": [1, 2], "scale": 2}, json=True) == 6.0
    assert dispatcher.call(f"{url}/async_thread") == LOOP_THREAD
    assert dispatcher.call(f"{url}/sync_thread") != LOOP_THREAD  # the request's own thread
    # every call went over one kept-alive connection
    assert server.stats.connections_opened == 1


def test_a_failing_async_task_is_a_500_and_logged(
    server: TaskServer, dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="dispatchkit.server"),
        pytest.raises(RemoteExecuteError) as error,
    ):
        dispatcher.call(f"{server.url}/aboom")
    assert (error.value.status, error.value.reason) == (500, "ValueError: async kaput")
    (record,) = [r for r in caplog.records if r.name == "dispatchkit.server"]
    assert record.exc_info is not None
    assert "aboom" in record.getMessage()


def test_head_runs_an_async_task_without_a_body(server: TaskServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/amultiply?x=2&y=3")
        get = conn.getresponse()
        assert json.loads(get.read()) == {"status": "success", "retval": 6}
        conn.request("HEAD", "/amultiply?x=2&y=3")
        head = conn.getresponse()
        assert head.read() == b""
        assert head.getheader("Content-Length") == get.getheader("Content-Length")
    finally:
        conn.close()


def test_async_tasks_share_one_loop(
    server: TaskServer, dispatcher: Dispatcher, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    # one asyncio.Event, awaited by one request and set by another: with a loop per
    # call (asyncio.run) the second request could not reach the first one's loop
    key = uuid.uuid4().hex
    slow = make_dispatcher(timeout=asgi_app.GATE_TIMEOUT + 5)
    result: dict[str, object] = {}
    waiting = threading.Thread(
        target=lambda: result.update(value=slow.call(f"{server.url}/await_gate", key=key))
    )
    waiting.start()
    try:
        wait_until(lambda: dispatcher.call(f"{server.url}/gate_started", key=key), "gate awaited")
    finally:
        dispatcher.call(f"{server.url}/open_gate", key=key)
        waiting.join(TIMEOUT + asgi_app.GATE_TIMEOUT)
    assert result == {"value": "opened"}


def test_the_loop_starts_on_first_use_and_close_ends_it(app: TaskApp) -> None:
    assert wsgi_get(app, "/multiply", "x=2&y=3") == (200, {"status": "success", "retval": 6})
    assert loop_thread(app) is None  # sync tasks need no loop
    assert wsgi_get(app, "/amultiply", "x=2&y=3")[0] == 200
    first = loop_thread(app)
    assert first is not None
    assert (first.name, first.daemon) == (LOOP_THREAD, True)
    app.close()
    assert not first.is_alive()  # joined by close()
    assert loop_thread(app) is None
    app.close()  # twice is harmless
    assert wsgi_get(app, "/amultiply", "x=3&y=3")[1]["retval"] == 9  # a new loop
    second = loop_thread(app)
    assert second is not None
    assert second is not first
    app.close()
    assert not second.is_alive()


def test_close_lets_a_running_async_task_finish_within_the_grace() -> None:
    app = TaskApp()
    started = threading.Event()

    @app.task
    async def slow() -> str:
        started.set()
        await asyncio.sleep(0.1)  # well within CLOSE_GRACE (5 s)
        return "finished"

    answers: list[tuple[int, Any]] = []
    request = threading.Thread(target=lambda: answers.append(wsgi_get(app, "/slow")))
    request.start()
    try:
        assert started.wait(TIMEOUT)
    finally:
        app.close()
        request.join(TIMEOUT)
    assert answers == [(200, {"status": "success", "retval": "finished"})]


def test_close_cancels_an_async_task_past_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_loop, "CLOSE_GRACE", 0.05)
    app = TaskApp()
    started = threading.Event()

    @app.task
    async def hang() -> None:
        started.set()
        await asyncio.sleep(TIMEOUT * 3)

    answers: list[tuple[int, Any]] = []
    request = threading.Thread(target=lambda: answers.append(wsgi_get(app, "/hang")))
    request.start()
    try:
        assert started.wait(TIMEOUT)
    finally:
        app.close()
        request.join(TIMEOUT)
    assert answers == [(503, {"status": "failure", "reason": "the task was cancelled"})]
    assert loop_thread(app) is None


def test_an_async_task_may_close_its_own_app() -> None:
    app = TaskApp()
    ran_on: list[threading.Thread] = []

    @app.task
    async def shutdown() -> str:
        ran_on.append(threading.current_thread())
        app.close()  # on the loop's own thread: it cannot join itself, it asks to stop
        return "closing"

    assert wsgi_get(app, "/shutdown") == (200, {"status": "success", "retval": "closing"})
    assert loop_thread(app) is None  # close() let go of it ...
    (thread,) = ran_on
    thread.join(TIMEOUT)
    assert not thread.is_alive()  # ... and it ended once the task had returned


def test_an_app_dropped_without_close_ends_its_loop() -> None:
    app = TaskApp()

    @app.task
    async def where() -> str:
        return threading.current_thread().name

    assert wsgi_get(app, "/where")[1]["retval"] == LOOP_THREAD
    thread = loop_thread(app)
    assert thread is not None
    del app
    gc.collect()  # the app and its ASGI view refer to each other
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def test_an_object_with_an_async_call_is_an_async_task(app: TaskApp) -> None:
    class Scaler:
        def __init__(self, factor: int) -> None:
            self.factor = factor

        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0)
            return x * self.factor

    app.task(Scaler(3), name="triple")
    assert wsgi_get(app, "/triple", "x=5") == (200, {"status": "success", "retval": 15})


def test_an_unencodable_async_return_value_is_a_500(
    app: TaskApp, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task
    async def unencodable() -> object:
        return object()

    with caplog.at_level(logging.CRITICAL, logger="dispatchkit.server"):
        status, answer = wsgi_get(app, "/unencodable")
    assert status == 500
    assert answer["reason"].startswith("cannot encode the return value: TypeError: ")
