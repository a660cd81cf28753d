"""TaskApp.asgi: served by a real uvicorn process, and called in-process.

The first half starts ``python -m uvicorn asgi_app:asgi`` (and ``asgi_app:signed``)
on 127.0.0.1 and calls it with a real Dispatcher and http.client; the second
calls the ASGI callable directly with a scope and fake ``receive``/``send``,
for what a server would hide (lifespan messages, a body in chunks, a client
that goes away) and to check that WSGI and ASGI answer every request alike.
Every wait is bounded: servers start within START_TIMEOUT or the test fails,
polls give up after TIMEOUT, and the processes are stopped (then killed) in
bounded time by the fixtures.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import importlib.util
import inspect
import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asgi_app
import pytest
from asgi_app import MAX_BODY_BYTES, SECRET

from conftest import require
from dispatchkit import Dispatcher, Envelope, RemoteExecuteError
from dispatchkit.builtin.codec import JSONCodec
from dispatchkit.server import TaskApp
from dispatchkit.signing import SigningKeys, generate_secret

HERE = Path(__file__).resolve().parent
TIMEOUT = 10.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
POLL = 0.01
FORM = "application/x-www-form-urlencoded"
READY = ("SUCCESS", "FAILURE")

# -- a real uvicorn process ---------------------------------------------------------------


@dataclass
class Uvicorn:
    """A uvicorn process serving ``target`` on 127.0.0.1:``port``; its output goes to ``log``."""

    target: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        """SIGTERM: uvicorn shuts down gracefully (lifespan shutdown); killed if stuck."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(server: Uvicorn) -> bool:
    """Whether the server answers its index within START_TIMEOUT (False: it exited)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            names = json.loads(response.read())["retval"]
            if response.status == 200 and "amultiply" in names:
                return True
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    return False


def start_uvicorn(target: str, log_dir: Path, attempts: int = 5) -> Uvicorn:
    """Start uvicorn on a free port; another port if that one was taken meanwhile."""
    require(importlib.util.find_spec("uvicorn") is not None, "uvicorn is not installed")
    for attempt in range(attempts):
        port = free_port()  # free now; uvicorn binds it next, or fails and we retry
        log = log_dir / f"{target.replace(':', '-')}-{attempt}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    target,
                    "--app-dir",
                    str(HERE),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--lifespan",
                    "on",
                    "--log-level",
                    "info",
                    "--timeout-graceful-shutdown",
                    "5",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = Uvicorn(target, process, port, log)
        if answers(server):
            return server
        server.stop()
        if "address already in use" not in server.output().lower():
            pytest.fail(f"uvicorn {target} did not start:\n{server.output()[-4000:]}")
    pytest.fail(f"uvicorn {target}: no free port after {attempts} attempts")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uvicorn]:
    """``asgi_app:asgi`` (the gateway on, max_body_bytes=1024) under uvicorn."""
    running = start_uvicorn("asgi_app:asgi", tmp_path_factory.mktemp("uvicorn"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def signed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uvicorn]:
    """``asgi_app:signed``: the same tasks, every call signed with SECRET."""
    running = start_uvicorn("asgi_app:signed", tmp_path_factory.mktemp("uvicorn-signed"))
    try:
        yield running
    finally:
        running.stop()


def fetch(
    server: Uvicorn,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[http.client.HTTPResponse, Any]:
    """One request on a fresh connection; the JSON answer (None for an empty body)."""
    conn = server.connection()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("Content-Length") is not None
    return response, json.loads(raw) if raw else None


def refused(call: Callable[[], object]) -> RemoteExecuteError:
    with pytest.raises(RemoteExecuteError) as caught:
        call()
    return caught.value


def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {TIMEOUT} s")
        time.sleep(POLL)


# -- tasks under uvicorn ------------------------------------------------------------------


@pytest.mark.parametrize("task", ["multiply", "amultiply"])
def test_sync_and_async_tasks_by_get_form_and_json(
    server: Uvicorn, dispatcher: Dispatcher, task: str
) -> None:
    url = f"{server.url}/{task}"
    assert dispatcher.call(url, x=6, y=7) == 42
    assert dispatcher.call(url, "POST", x=6, y=7) == 42
    assert dispatcher.apply(url, "POST", {"x": 6, "y": 7}, json=True) == 42
    assert dispatcher.call(f"{url}?y=7", "POST", x=6) == 42  # the query underneath a body


def test_arguments_are_converted_by_annotation_for_async_tasks(
    server: Uvicorn, dispatcher: Dispatcher
) -> None:
    url = f"{server.url}/total"
    assert dispatcher.call(url, xs=[1, 2, 3], scale="0.5") == 3.0
    assert dispatcher.apply(url, "POST", {"xs": [1, 2], "scale": 2}, json=True) == 6.0


@pytest.mark.parametrize(
    ("task", "reason"), [("boom", "RuntimeError: kaput"), ("aboom", "ValueError: async kaput")]
)
def test_a_failing_task_is_a_remote_execute_error(
    server: Uvicorn, dispatcher: Dispatcher, task: str, reason: str
) -> None:
    error = refused(lambda: dispatcher.call(f"{server.url}/{task}"))
    assert (error.status, error.reason) == (500, reason)


def test_refusals_are_failure_envelopes(server: Uvicorn, dispatcher: Dispatcher) -> None:
    url = server.url
    error = refused(lambda: dispatcher.call(f"{url}/nope"))
    assert (error.status, error.reason) == (404, "unknown task 'nope'")
    error = refused(lambda: dispatcher.call(f"{url}/amultiply", x="six", y=7))
    assert (error.status, error.reason) == (400, "argument 'x': invalid int 'six'")
    error = refused(lambda: dispatcher.call(f"{url}/multiply", "POST", x=1))
    assert (error.status, error.reason) == (400, "missing argument 'y'")
    error = refused(lambda: dispatcher.call(f"{url}/amultiply", x=1, y=2, z=3))
    assert (error.status, error.reason) == (400, "unexpected argument 'z'")


def test_other_methods_are_405_with_allow(server: Uvicorn) -> None:
    response, answer = fetch(server, "PUT", "/amultiply", body=b"x=1")
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD, POST"
    assert answer == {"status": "failure", "reason": "method 'PUT' not allowed"}
    response, _ = fetch(server, "POST", "/")
    assert (response.status, response.getheader("Allow")) == (405, "GET, HEAD")
    response, _ = fetch(server, "DELETE", "/apply/multiply")
    assert (response.status, response.getheader("Allow")) == (405, "GET, POST")


def test_head_runs_like_get_without_a_body(server: Uvicorn) -> None:
    get, answer = fetch(server, "GET", "/amultiply?x=2&y=3")
    head, nothing = fetch(server, "HEAD", "/amultiply?x=2&y=3")
    assert answer == {"status": "success", "retval": 6}
    assert nothing is None
    assert head.status == 200
    assert head.getheader("Content-Length") == get.getheader("Content-Length")


def test_an_unsupported_body_is_415(server: Uvicorn) -> None:
    response, answer = fetch(
        server, "POST", "/echo", body=b"s=x", headers={"Content-Type": "text/plain"}
    )
    assert response.status == 415
    assert answer["reason"].startswith("unsupported Content-Type 'text/plain'")


def test_a_body_over_max_body_bytes_is_413(server: Uvicorn, dispatcher: Dispatcher) -> None:
    error = refused(lambda: dispatcher.call(f"{server.url}/echo", "POST", s="x" * 2000))
    assert (error.status, error.reason) == (413, f"request body exceeds {MAX_BODY_BYTES} bytes")
    assert dispatcher.call(f"{server.url}/echo", "POST", s="fits") == "fits"


def test_a_chunked_body_is_bounded_while_it_streams(server: Uvicorn) -> None:
    # no Content-Length: http.client sends an iterable with Transfer-Encoding: chunked
    chunks = [b"s=", b"x" * 600, b"x" * 600]
    response, answer = fetch(server, "POST", "/echo", iter(chunks), {"Content-Type": FORM})
    assert response.status == 413
    assert answer["reason"] == f"request body exceeds {MAX_BODY_BYTES} bytes"
    within = iter([b"s=ab", b"cd"])
    response, answer = fetch(server, "POST", "/echo", within, {"Content-Type": FORM})
    assert (response.status, answer) == (200, {"status": "success", "retval": "abcd"})


def test_connections_are_kept_alive(
    server: Uvicorn, dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    conn = server.connection()
    try:
        conn.connect()
        sock = conn.sock
        for path in ("/multiply?x=1&y=2", "/amultiply?x=3&y=4", "/", "/nope"):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert not response.will_close
            assert conn.sock is sock  # http.client reconnects when the server closes
    finally:
        conn.close()
    with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
        for i in range(4):
            assert dispatcher.call(f"{server.url}/amultiply", x=i, y=2) == 2 * i
    opened = [
        record
        for record in caplog.records
        if record.name == "urllib3.connectionpool"
        and record.getMessage().startswith(("Starting new", "Resetting dropped"))
    ]
    assert len(opened) == 1, [record.getMessage() for record in opened]


def test_sync_tasks_run_on_worker_threads_async_tasks_on_the_loop(
    server: Uvicorn, dispatcher: Dispatcher
) -> None:
    # uvicorn runs its event loop in the main thread
    assert dispatcher.call(f"{server.url}/async_thread") == "MainThread"
    assert dispatcher.call(f"{server.url}/sync_thread") != "MainThread"


def test_a_blocked_sync_task_does_not_block_the_loop(
    server: Uvicorn, dispatcher: Dispatcher, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    key = uuid.uuid4().hex
    slow = make_dispatcher(timeout=asgi_app.GATE_TIMEOUT + 5)
    result: dict[str, object] = {}
    blocked = threading.Thread(
        target=lambda: result.update(value=slow.call(f"{server.url}/block", key=key))
    )
    blocked.start()
    try:
        # each of these is answered while `block` holds its worker thread
        wait_until(lambda: dispatcher.call(f"{server.url}/started", key=key), "block started")
        assert dispatcher.call(f"{server.url}/amultiply", x=2, y=3) == 6
        assert dispatcher.call(f"{server.url}/multiply", x=2, y=3) == 6
    finally:
        dispatcher.call(f"{server.url}/release", key=key)
        blocked.join(TIMEOUT + asgi_app.GATE_TIMEOUT)
    assert result == {"value": "released"}


def test_async_tasks_interleave_on_the_servers_loop(
    server: Uvicorn, dispatcher: Dispatcher, make_dispatcher: Callable[..., Dispatcher]
) -> None:
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
        # one asyncio.Event, set by one call and awaited by another: the same loop
        dispatcher.call(f"{server.url}/open_gate", key=key)
        waiting.join(TIMEOUT + asgi_app.GATE_TIMEOUT)
    assert result == {"value": "opened"}


# -- the gateway under uvicorn ------------------------------------------------------------


class GatewayClient:
    """Apply, then poll status and done, over one kept-alive connection."""

    def __init__(self, server: Uvicorn) -> None:
        self.conn = server.connection()

    def request(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, Any]:
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def apply(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        status, answer = self.request(method, path, body, **(headers or {}))
        assert status == 200, answer
        assert answer["ok"] == "true"
        task_id: str = answer["task_id"]
        return task_id

    def wait(self, task_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            status, answer = self.request("GET", f"/{task_id}/status")
            assert status == 200
            task: dict[str, Any] = answer["task"]
            if task["status"] in READY:
                return task
            if time.monotonic() > deadline:
                pytest.fail(f"task {task_id} still {task['status']} after {TIMEOUT} s")
            time.sleep(POLL)

    def done(self, task_id: str) -> bool:
        status, answer = self.request("GET", f"/{task_id}/done")
        assert status == 200
        executed: bool = answer["task"]["executed"]
        return executed

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def gateway(server: Uvicorn) -> Iterator[GatewayClient]:
    client = GatewayClient(server)
    yield client
    client.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"),
    [
        ("GET", "/apply/amultiply?x=6&y=7", None, {}),
        ("POST", "/apply/multiply", b"x=6&y=7", {"Content-Type": FORM}),
        ("POST", "/apply/amultiply", b'{"x": 6, "y": 7}', {"Content-Type": "application/json"}),
    ],
)
def test_gateway_apply_status_done(
    gateway: GatewayClient, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> None:
    task_id = gateway.apply(method, path, body, headers)
    assert gateway.wait(task_id) == {"id": task_id, "status": "SUCCESS", "result": 42}
    assert gateway.done(task_id) is True


def test_gateway_reports_a_failing_async_task(gateway: GatewayClient) -> None:
    task_id = gateway.apply("GET", "/apply/aboom")
    task = gateway.wait(task_id)
    assert (task["status"], task["result"]) == ("FAILURE", "ValueError: async kaput")
    assert task["exc"] == "dispatchkit.exceptions.RemoteExecuteError"


def test_gateway_idempotency_key_and_refusals(gateway: GatewayClient) -> None:
    key = f"order-{uuid.uuid4().hex}"
    assert gateway.apply("GET", "/apply/amultiply?x=1&y=2", None, {"Idempotency-Key": key}) == key
    assert gateway.wait(key)["result"] == 2
    status, answer = gateway.request("GET", "/apply/nope")
    assert (status, answer["reason"]) == (404, "unknown task: 'nope'")
    status, answer = gateway.request("GET", f"/{uuid.uuid4().hex}/status")
    assert (status, answer["task"]["status"]) == (200, "PENDING")


# -- signatures under uvicorn -------------------------------------------------------------


def test_signed_calls_are_accepted(
    signed_server: Uvicorn, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    signer = make_dispatcher(signing_secret=SECRET)
    url = signed_server.url
    # GET signs the raw query string as sent (percent-encoded): the server checks the same bytes
    assert signer.call(f"{url}/echo", s="a b/ü&=?") == "a b/ü&=?"
    assert signer.call(f"{url}/amultiply", "POST", x=6, y=7) == 42
    assert signer.apply(f"{url}/amultiply", "POST", {"x": 6, "y": 7}, json=True) == 42


def test_bad_signatures_are_refused(
    signed_server: Uvicorn, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    url = signed_server.url
    other = make_dispatcher(signing_secret=generate_secret())
    for method in ("GET", "POST"):
        error = refused(functools.partial(other.call, f"{url}/amultiply", method, x=6, y=7))
        assert error.status == 401
        assert error.reason == "no valid signature: no v1 signature matches a known key"
    unsigned = make_dispatcher()
    error = refused(lambda: unsigned.call(f"{url}/multiply", x=6, y=7))
    assert error.status == 401
    assert error.reason.startswith("missing signature header(s)")


def signed_headers(payload: bytes, msg_id: str | None = None) -> dict[str, str]:
    msg_id = msg_id or uuid.uuid4().hex
    timestamp = str(int(time.time()))
    signature = SigningKeys.parse(SECRET).signature(msg_id, timestamp, payload)
    return {"webhook-id": msg_id, "webhook-timestamp": timestamp, "webhook-signature": signature}


def test_a_replayed_signature_is_refused(signed_server: Uvicorn) -> None:
    headers = {**signed_headers(b"x=6&y=7"), "Content-Type": FORM}
    response, answer = fetch(signed_server, "POST", "/multiply", b"x=6&y=7", headers)
    assert (response.status, answer["retval"]) == (200, 42)
    response, answer = fetch(signed_server, "POST", "/multiply", b"x=6&y=7", headers)
    assert (response.status, answer["reason"]) == (401, "replayed webhook-id: already received")


def test_a_signed_apply_calls_back_signed(signed_server: Uvicorn) -> None:
    client = GatewayClient(signed_server)
    try:
        status, _answer = client.request("GET", "/apply/amultiply?x=6&y=7")
        assert status == 401  # unsigned: refused, nothing applied
        headers = {**signed_headers(b"x=6&y=7"), "Content-Type": FORM}
        task_id = client.apply("POST", "/apply/amultiply", b"x=6&y=7", headers)
        # the gateway's own Dispatcher signs its call back to /amultiply, or it would fail
        assert client.wait(task_id) == {"id": task_id, "status": "SUCCESS", "result": 42}
    finally:
        client.close()


# -- lifespan under uvicorn ---------------------------------------------------------------


def test_uvicorn_runs_the_lifespan_startup_and_shutdown(tmp_path: Path) -> None:
    running = start_uvicorn("asgi_app:asgi", tmp_path)
    try:
        client = GatewayClient(running)
        try:  # the gateway's own Dispatcher exists now: shutdown closes it
            assert client.wait(client.apply("GET", "/apply/multiply?x=2&y=3"))["result"] == 6
        finally:
            client.close()
    finally:
        running.stop()
    output = running.output()
    assert "Application startup complete." in output
    assert "Application shutdown complete." in output
    assert "Traceback" not in output


# -- the ASGI callable in-process ---------------------------------------------------------

Sent = list[dict[str, Any]]


def scope(method: str, path: str, query: bytes = b"", **extra: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        **extra,
    }


class FakeReceive:
    """Hands out ``messages`` in order, then ``http.disconnect``; counts the calls."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = list(messages)
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.messages:
            return self.messages.pop(0)
        return {"type": "http.disconnect"}


def body_messages(*chunks: bytes) -> list[dict[str, Any]]:
    if not chunks:
        return [{"type": "http.request", "body": b"", "more_body": False}]
    last = len(chunks) - 1
    return [
        {"type": "http.request", "body": chunk, "more_body": i < last}
        for i, chunk in enumerate(chunks)
    ]


def run_asgi(
    asgi: Callable[..., Any], the_scope: dict[str, Any], receive: Callable[[], Any]
) -> Sent:
    sent: Sent = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        await asyncio.wait_for(asgi(the_scope, receive, send), TIMEOUT)

    asyncio.run(main())
    return sent


def asgi_answer(sent: Sent) -> tuple[int, list[tuple[str, str]], bytes]:
    start, body = sent
    assert start["type"] == "http.response.start"
    assert body["type"] == "http.response.body"
    assert not body.get("more_body", False)
    headers = [
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in start["headers"]
    ]
    return start["status"], headers, body["body"]


@pytest.fixture
def app() -> Iterator[TaskApp]:
    made = asgi_app.make_app()
    yield made
    made.close()


def call(
    app: TaskApp,
    method: str,
    path: str,
    query: bytes = b"",
    headers: dict[str, str] | None = None,
    chunks: tuple[bytes, ...] = (),
) -> tuple[int, list[tuple[str, str]], bytes]:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    receive = FakeReceive(body_messages(*chunks))
    return asgi_answer(run_asgi(app.asgi, scope(method, path, query, headers=raw), receive))


def test_asgi_is_one_asgi3_callable(app: TaskApp) -> None:
    assert app.asgi is app.asgi
    assert inspect.iscoroutinefunction(type(app.asgi).__call__)


def test_in_process_sync_tasks_run_on_a_worker_thread(app: TaskApp) -> None:
    loop_thread = threading.current_thread().name  # asyncio.run runs the loop here
    status, _, body = call(app, "GET", "/async_thread")
    assert (status, json.loads(body)["retval"]) == (200, loop_thread)
    status, _, body = call(app, "GET", "/sync_thread")
    assert status == 200
    assert json.loads(body)["retval"] != loop_thread


def test_lifespan_startup_then_shutdown_closes_the_app(app: TaskApp) -> None:
    receive = FakeReceive([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent = run_asgi(app.asgi, {"type": "lifespan", "asgi": {"version": "3.0"}}, receive)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    status, _, body = call(app, "GET", "/apply/multiply", b"x=1&y=2")
    assert (status, json.loads(body)["reason"]) == (503, "the gateway is closed")
    assert call(app, "GET", "/multiply", b"x=1&y=2")[0] == 200  # tasks are still served


def test_lifespan_shutdown_failure_is_reported(
    app: TaskApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_close() -> None:
        raise RuntimeError("cannot close")

    monkeypatch.setattr(app, "close", failing_close)
    receive = FakeReceive([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    with caplog.at_level(logging.CRITICAL, logger="dispatchkit.server"):
        sent = run_asgi(app.asgi, {"type": "lifespan"}, receive)
    assert sent == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.failed", "message": "RuntimeError: cannot close"},
    ]


def test_a_body_in_chunks_is_read_whole(app: TaskApp) -> None:
    status, _, body = call(
        app, "POST", "/echo", headers={"Content-Type": FORM}, chunks=(b"s=a", b"b", b"c")
    )
    assert (status, json.loads(body)["retval"]) == (200, "abc")


def test_a_streamed_body_is_refused_once_it_exceeds_the_limit() -> None:
    small = TaskApp(max_body_bytes=10)
    small.task(lambda s: s, name="echo")
    receive = FakeReceive(body_messages(b"s=", b"x" * 5, b"x" * 5, b"x" * 5, b"x" * 5))
    status, _, body = asgi_answer(run_asgi(small.asgi, scope("POST", "/echo"), receive))
    assert (status, json.loads(body)["reason"]) == (413, "request body exceeds 10 bytes")
    assert receive.calls == 3  # 2 + 5 + 5 bytes: refused there, the rest never received


def test_an_announced_body_over_the_limit_is_refused_unread() -> None:
    small = TaskApp(max_body_bytes=10)
    small.task(lambda s: s, name="echo")
    receive = FakeReceive(body_messages(b"s=" + b"x" * 100))
    the_scope = scope("POST", "/echo", headers=[(b"content-length", b"102")])
    status, _, _ = asgi_answer(run_asgi(small.asgi, the_scope, receive))
    assert (status, receive.calls) == (413, 0)


def test_a_body_shorter_than_its_content_length_is_400(app: TaskApp) -> None:
    headers = {"Content-Length": "10", "Content-Type": FORM}
    status, _, body = call(app, "POST", "/echo", headers=headers, chunks=(b"s=abc",))
    assert (status, json.loads(body)["reason"]) == (400, "request body shorter than Content-Length")


def test_a_client_gone_before_its_body_gets_no_answer(app: TaskApp) -> None:
    receive = FakeReceive([{"type": "http.request", "body": b"s=", "more_body": True}])
    assert run_asgi(app.asgi, scope("POST", "/echo"), receive) == []


def test_the_mount_point_is_taken_off_the_path(app: TaskApp) -> None:
    the_scope = scope("GET", "/tasks/multiply", b"x=2&y=5", root_path="/tasks")
    status, _, body = asgi_answer(run_asgi(app.asgi, the_scope, FakeReceive([])))
    assert (status, json.loads(body)["retval"]) == (200, 10)


def test_a_websocket_is_refused(app: TaskApp) -> None:
    receive = FakeReceive([{"type": "websocket.connect"}])
    sent = run_asgi(app.asgi, {"type": "websocket", "path": "/"}, receive)
    assert sent == [{"type": "websocket.close", "code": 1000}]


def test_an_unknown_scope_type_is_an_error(app: TaskApp) -> None:
    with pytest.raises(ValueError, match="unsupported ASGI scope type 'carrier-pigeon'"):
        run_asgi(app.asgi, {"type": "carrier-pigeon"}, FakeReceive([]))


class BrokenCodec(JSONCodec):
    def encode(self, envelope: Envelope) -> bytes:
        raise RuntimeError("broken codec")


def test_a_failure_of_the_app_itself_is_a_json_500(caplog: pytest.LogCaptureFixture) -> None:
    broken = TaskApp(codec=BrokenCodec())
    broken.task(lambda: 1, name="one")
    with caplog.at_level(logging.CRITICAL, logger="dispatchkit.server"):
        sent = run_asgi(broken.asgi, scope("GET", "/one"), FakeReceive([]))
    status, headers, body = asgi_answer(sent)
    assert (status, json.loads(body)) == (
        500,
        {"status": "failure", "reason": "internal server error"},
    )
    assert ("content-type", "application/json") in headers
    # the built-in server answers a failing WSGI app the same way
    with broken.server(port=0) as running:
        conn = http.client.HTTPConnection(running.host, running.port, timeout=TIMEOUT)
        try:
            with caplog.at_level(logging.CRITICAL, logger="dispatchkit.server"):
                conn.request("GET", "/one")
                response = conn.getresponse()
            assert (response.status, response.read()) == (500, body)
        finally:
            conn.close()


# -- WSGI and ASGI answer alike -----------------------------------------------------------


def wsgi_call(
    app: TaskApp, method: str, path: str, query: bytes, headers: dict[str, str], body: bytes
) -> tuple[int, list[tuple[str, str]], bytes]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
    }
    for name, value in headers.items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(
        status: str, response_headers: list[tuple[str, str]], exc_info: Any = None, /
    ) -> Callable[[bytes], object]:
        started.append((status, response_headers))
        return lambda data: None

    answer = b"".join(app(environ, start_response))
    (status, response_headers), *_ = started
    return int(status.split()[0]), [(k.lower(), v) for k, v in response_headers], answer


JSON = {"Content-Type": "application/json"}
FORM_HEADERS = {"Content-Type": FORM}

PARITY = [
    ("GET", "/", b"", {}, b""),
    ("HEAD", "/", b"", {}, b""),
    ("GET", "/multiply", b"x=6&y=7", {}, b""),
    ("GET", "/amultiply", b"x=6&y=7", {}, b""),
    ("HEAD", "/amultiply", b"x=6&y=7", {}, b""),
    ("POST", "/amultiply", b"y=1", FORM_HEADERS, b"x=6&y=7"),
    ("POST", "/amultiply", b"", {}, b"x=6&y=7"),  # no Content-Type: a form
    ("POST", "/total", b"", JSON, b'{"xs": [1, 2], "scale": 1.5}'),
    ("POST", "/total", b"", {"Content-Type": "application/vnd.x+json"}, b'{"xs": [4]}'),
    ("GET", "/total", b"xs=1&xs=2&xs=3", {}, b""),
    ("GET", "/echo", b"s=%C3%BC+%26", {}, b""),
    ("GET", "/boom", b"", {}, b""),
    ("GET", "/aboom", b"", {}, b""),
    ("GET", "/amultiply", b"x=six&y=1", {}, b""),
    ("GET", "/amultiply", b"x=1", {}, b""),
    ("GET", "/amultiply", b"x=1&y=2&z=3", {}, b""),
    ("GET", "/amultiply", b"x=\xff", {}, b""),
    ("POST", "/amultiply", b"", JSON, b"[1, 2]"),
    ("POST", "/amultiply", b"", JSON, b"{nope"),
    ("POST", "/echo", b"", FORM_HEADERS, b"s=\xff"),
    ("POST", "/echo", b"", {"Content-Type": "text/plain"}, b"s=x"),
    ("POST", "/echo", b"", FORM_HEADERS, b"s=" + b"x" * MAX_BODY_BYTES),
    ("POST", "/echo", b"", {**FORM_HEADERS, "Content-Length": "12x"}, b"s=x"),
    ("POST", "/echo", b"", {**FORM_HEADERS, "Content-Length": "9" * 5000}, b"s=x"),
    ("POST", "/echo", b"", {**FORM_HEADERS, "Content-Length": "0" * 5000 + "3"}, b"s=x"),
    ("GET", "/nope", b"", {}, b""),
    ("GET", "/gr\u00fc\u00dfe", b"", {}, b""),
    ("PUT", "/multiply", b"", {}, b"x=1"),
    ("DELETE", "/", b"", {}, b""),
    ("GET", "/apply/nope", b"", {}, b""),
    ("PUT", "/apply/multiply", b"", {}, b""),
    ("GET", "/apply/multiply", b"x=1&y=2", {"Idempotency-Key": "bad key!"}, b""),
    ("GET", "/0123abc/status", b"", {}, b""),
    ("HEAD", "/0123abc/done", b"", {}, b""),
    ("POST", "/0123abc/status", b"", {}, b""),
]


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "body"),
    PARITY,
    ids=[f"{m} {p}?{q.decode('latin-1')}" for m, p, q, _, _ in PARITY],
)
def test_wsgi_and_asgi_answer_alike(
    app: TaskApp, method: str, path: str, query: bytes, headers: dict[str, str], body: bytes
) -> None:
    headers = dict(headers)
    if body and "Content-Length" not in headers:
        headers["Content-Length"] = str(len(body))
    wsgi = wsgi_call(app, method, path, query, headers, body)
    chunks = (body[: len(body) // 2], body[len(body) // 2 :]) if body else ()
    asgi = call(app, method, path, query, headers, chunks)
    assert asgi == wsgi
    assert (wsgi[2] == b"") if method == "HEAD" else json.loads(wsgi[2])  # JSON, never HTML


DEEP = b"[" * 1000 + b"]" * 1000


@pytest.mark.parametrize(
    ("path", "headers", "body", "status"),
    [
        ("/echo", {**FORM_HEADERS, "Content-Length": "9" * 5000}, b"s=x", 413),
        ("/echo", {**FORM_HEADERS, "Content-Length": "0" * 5000 + "3"}, b"s=x", 200),
        ("/amultiply", JSON, b'{"x": ' + DEEP + b', "y": 1}', 400),
        ("/apply/multiply", JSON, b'{"x": ' + DEEP + b"}", 400),
    ],
    ids=["5000-digit-length", "zeros-then-3", "deep-argument", "deep-apply"],
)
def test_hostile_lengths_and_depths_get_a_clear_answer_on_both(
    path: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    app = asgi_app.make_app(max_body_bytes=10_000)  # room for a body 1,000 deep
    headers = {"Content-Length": str(len(body)), **headers}
    wsgi = wsgi_call(app, "POST", path, b"", headers, body)
    assert wsgi[0] == status, wsgi
    assert json.loads(wsgi[2])  # an envelope, never a dropped connection or HTML
    assert call(app, "POST", path, b"", headers, (body,))[0] == status
    app.close()
