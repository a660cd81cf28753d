"""The keep-alive threaded server, and TaskApp's WSGI compliance, over real sockets."""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import wsgiref.simple_server
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.validate import validator

import pytest

from dispatchkit.server import ServerStats, TaskApp, TaskServer

TIMEOUT = 10.0


def make_app(**options: Any) -> TaskApp:
    app = TaskApp(**options)

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    @app.task
    def echo(s: str) -> str:
        return s

    @app.task
    def boom() -> None:
        raise RuntimeError("kaput")

    return app


@pytest.fixture
def server() -> Iterator[TaskServer]:
    with make_app().server(port=0) as server:
        yield server


@pytest.fixture
def conn(server: TaskServer) -> Iterator[http.client.HTTPConnection]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    yield conn
    conn.close()


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[http.client.HTTPResponse, Any]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    raw = response.read()
    return response, json.loads(raw) if raw else None


def raw_exchange(server: TaskServer, data: bytes) -> bytes:
    """Send ``data`` on a raw socket and read until the server closes the connection."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[str, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    return status_line, headers, json.loads(body)


# -- keep-alive and counters ------------------------------------------------------------


def test_requests_share_one_kept_alive_connection(
    server: TaskServer, conn: http.client.HTTPConnection
) -> None:
    sockets = set()
    for n in range(5):
        response, envelope = call(conn, "GET", f"/multiply?x={n}&y=2")
        assert envelope == {"status": "success", "retval": n * 2}
        assert response.getheader("Connection") is None
        sockets.add(id(conn.sock))
    assert len(sockets) == 1
    assert server.stats.connections_opened == 1
    assert server.stats.requests_served == 5


def test_two_connections_are_counted(server: TaskServer) -> None:
    for _ in range(2):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
        try:
            call(conn, "GET", "/multiply?x=1&y=1")
            call(
                conn, "POST", "/echo", "s=a", {"Content-Type": "application/x-www-form-urlencoded"}
            )
        finally:
            conn.close()
    assert (server.stats.connections_opened, server.stats.requests_served) == (2, 4)


def test_stats_reset(server: TaskServer, conn: http.client.HTTPConnection) -> None:
    call(conn, "GET", "/multiply?x=1&y=1")
    server.stats.reset()
    assert (server.stats.connections_opened, server.stats.requests_served) == (0, 0)
    call(conn, "GET", "/multiply?x=1&y=1")
    assert (server.stats.connections_opened, server.stats.requests_served) == (0, 1)


def test_stats_count_from_many_threads() -> None:
    stats = ServerStats()

    def bump() -> None:
        for _ in range(1000):
            stats._count_request()

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert stats.requests_served == 8000


def test_connection_close_from_client_is_honoured(
    server: TaskServer, conn: http.client.HTTPConnection
) -> None:
    response, envelope = call(conn, "GET", "/multiply?x=2&y=2", headers={"Connection": "close"})
    assert envelope["retval"] == 4
    assert response.getheader("Connection") == "close"
    assert conn.sock is None  # http.client saw the close and dropped its socket
    call(conn, "GET", "/multiply?x=2&y=2")  # reconnects
    assert server.stats.connections_opened == 2


def test_server_closes_after_announcing_close(server: TaskServer) -> None:
    raw = raw_exchange(
        server, b"GET /multiply?x=3&y=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    status_line, headers, envelope = split_response(raw)
    assert status_line == "HTTP/1.1 200 OK"
    assert headers["connection"] == "close"
    assert envelope["retval"] == 9


def test_http10_client_gets_one_request_per_connection(server: TaskServer) -> None:
    status_line, headers, envelope = split_response(
        raw_exchange(server, b"GET /multiply?x=1&y=5 HTTP/1.0\r\n\r\n")
    )
    assert status_line.endswith("200 OK")
    assert headers["connection"] == "close"
    assert envelope["retval"] == 5


def test_idle_connection_is_closed_after_idle_timeout() -> None:
    with make_app().server(port=0, idle_timeout=0.3) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
        try:
            call(conn, "GET", "/multiply?x=1&y=1")
            assert conn.sock is not None
            conn.sock.settimeout(TIMEOUT)
            assert conn.sock.recv(1) == b""  # the server closed it; we did not wait forever
        finally:
            conn.close()


def test_stop_closes_idle_connections(server: TaskServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        call(conn, "GET", "/multiply?x=1&y=1")
        assert conn.sock is not None
        server.stop()
        conn.sock.settimeout(TIMEOUT)
        assert conn.sock.recv(1) == b""
    finally:
        conn.close()
    server.stop()  # a second stop is harmless
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=TIMEOUT).close()


# -- request bodies and protocol errors -------------------------------------------------


def test_small_oversized_body_is_drained_and_connection_kept() -> None:
    with make_app(max_body_bytes=16).server(port=0) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
        try:
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            response, envelope = call(conn, "POST", "/echo", "s=" + "x" * 1000, form)
            assert response.status == 413
            assert envelope["status"] == "failure"
            _, envelope = call(conn, "GET", "/echo?s=again")
            assert envelope["retval"] == "again"
        finally:
            conn.close()
        assert server.stats.connections_opened == 1


def test_large_oversized_body_gets_413_then_close() -> None:
    with make_app(max_body_bytes=1024).server(port=0) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
        try:
            json_type = {"Content-Type": "application/json"}
            response, envelope = call(conn, "POST", "/echo", b"x" * (512 * 1024), json_type)
            assert response.status == 413
            assert envelope == {"status": "failure", "reason": "request body exceeds 1024 bytes"}
            assert response.getheader("Connection") == "close"
        finally:
            conn.close()


def test_announced_length_over_limit_is_413_without_reading() -> None:
    with make_app(max_body_bytes=1024).server(port=0) as server:
        raw = raw_exchange(
            server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
        )
    status_line, headers, envelope = split_response(raw)
    assert status_line.startswith("HTTP/1.1 413")
    assert headers["connection"] == "close"
    assert envelope["status"] == "failure"


def test_a_length_with_5000_zeros_in_front_is_read_as_its_value(server: TaskServer) -> None:
    raw = raw_exchange(
        server,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"0" * 5000 + b"3\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\r\ns=a",
    )
    status_line, _, envelope = split_response(raw)
    assert status_line.startswith("HTTP/1.1 200")
    assert envelope == {"status": "success", "retval": "a"}


def test_chunked_body_is_411(server: TaskServer) -> None:
    raw = raw_exchange(
        server,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n3\r\ns=a\r\n0\r\n\r\n",
    )
    status_line, _, envelope = split_response(raw)
    assert status_line.startswith("HTTP/1.1 411")
    assert envelope["status"] == "failure"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/one\r\n\r\n", 400),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"BREW /echo HTTP/1.1\r\nHost: x\r\n\r\n", 501),
        (b"GET /echo?s=1 HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /echo?s=1 HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
        # more digits than int() reads (4,300)
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 413),
    ],
)
def test_protocol_errors_are_json_envelopes(
    server: TaskServer, request_bytes: bytes, status: int
) -> None:
    status_line, headers, envelope = split_response(raw_exchange(server, request_bytes))
    assert status_line.split()[1] == str(status)
    assert headers["connection"] == "close"
    assert envelope["status"] == "failure"
    assert envelope["reason"]


def test_headers_reach_the_app_as_cgi_variables() -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        seen["body"] = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"status":"success"}']

    with TaskServer(app) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
        try:
            call(
                conn,
                "POST",
                "/a%20b/c?q=%20",
                b"hello",
                {"X-Trace": "1", "X_Trace": "spoof", "Content-Type": "text/plain"},
            )
        finally:
            conn.close()
    assert seen["PATH_INFO"] == "/a b/c"
    assert seen["QUERY_STRING"] == "q=%20"
    assert seen["HTTP_X_TRACE"] == "1"
    assert (seen["CONTENT_TYPE"], seen["CONTENT_LENGTH"], seen["body"]) == (
        "text/plain",
        "5",
        b"hello",
    )
    assert "HTTP_CONTENT_TYPE" not in seen
    assert seen["SERVER_PORT"] == str(server.port)


def test_failing_wsgi_app_gets_json_500(caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("broken app")

    with TaskServer(app) as server, caplog.at_level("CRITICAL", logger="dispatchkit.server"):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
        try:
            response, envelope = call(conn, "GET", "/")
        finally:
            conn.close()
    assert response.status == 500
    assert envelope == {"status": "failure", "reason": "internal server error"}


# -- the listen backlog -----------------------------------------------------------------


def somaxconn() -> int:
    """The kernel's cap on a listen backlog (Linux)."""
    return int(Path("/proc/sys/net/core/somaxconn").read_text(encoding="ascii"))


def connects_completed(server: TaskServer, count: int, wait: float) -> int:
    """Connect ``count`` clients to a server that accepts none; how many got established.

    Nothing calls accept(), so only the listen queue holds them: once it is full
    the kernel drops the next SYNs, and those connects stay in progress (SYN
    retries) until the wait ends. Waits until all are established, at most
    ``wait`` seconds.
    """
    sockets: list[socket.socket] = []
    established = 0
    with selectors.DefaultSelector() as selector:
        try:
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setblocking(False)
                error = sock.connect_ex((server.host, server.port))
                assert error in (0, errno.EINPROGRESS), os.strerror(error)
                selector.register(sock, selectors.EVENT_WRITE)
            deadline = time.monotonic() + wait
            while selector.get_map() and (left := deadline - time.monotonic()) > 0:
                for key, _ in selector.select(left):
                    sock = key.fileobj  # type: ignore[assignment]
                    selector.unregister(sock)
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        established += 1
        finally:
            for sock in sockets:
                sock.close()
    return established


LINUX = sys.platform.startswith("linux")


@pytest.mark.skipif(not LINUX, reason="the listen queue's overflow behaviour is Linux's")
def test_the_listen_queue_holds_a_burst_of_200_connections() -> None:
    count = min(200, somaxconn())  # the kernel caps the backlog at somaxconn
    assert count > 6, "somaxconn too small to tell a backlog of 5 from a larger one"
    server = make_app().server(port=0).listen()  # listening, but nothing accepts yet
    try:
        assert connects_completed(server, count, wait=5.0) == count
    finally:
        server.stop()


@pytest.mark.skipif(not LINUX, reason="the listen queue's overflow behaviour is Linux's")
def test_backlog_is_the_listen_queue_size() -> None:
    server = make_app().server(port=0, backlog=8).listen()
    try:
        # Linux queues backlog + 1 connections; the rest stay in SYN retry
        assert connects_completed(server, 40, wait=0.5) < 40
    finally:
        server.stop()
    with make_app().server(port=0, backlog=300) as served:  # and serves as usual
        conn = http.client.HTTPConnection(served.host, served.port, timeout=TIMEOUT)
        try:
            assert call(conn, "GET", "/multiply?x=2&y=3")[1]["retval"] == 6
        finally:
            conn.close()


@pytest.mark.parametrize("backlog", [0, -1, 1.5, True, 65536, 10**20])
def test_bad_backlog(backlog: Any) -> None:
    with pytest.raises(ValueError, match="backlog"):
        make_app().server(backlog=backlog)


# -- request_timeout: a request must arrive whole in time -------------------------------


def open_connections(server: TaskServer) -> int:
    """Connections the server still holds (each one is a thread)."""
    httpd = server._httpd
    return 0 if httpd is None else len(httpd._connections)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {TIMEOUT}s")
        time.sleep(0.01)


TRICKLE_INTERVAL = 0.2


def trickle(
    server: TaskServer, prefix: bytes, trickled: bytes, clients: int, most: int = 50
) -> list[bytes]:
    """``clients`` connections send ``prefix`` at once, then ``trickled`` one byte every 0.2 s.

    Each stops when the server closes its connection; every one gives up after
    ``most`` trickled bytes (10 s). Returns what each received, and fails the
    test if a connection was still open at the end.

    The bytes are paced by the clock, not by the loop's turns: an answer or an
    end-of-file on any connection ends a turn's wait early, and under load those
    spread out over many turns, so a byte a turn would spend ``most`` bytes in
    about a second, before the last connections' request_timeout is even up.
    """
    assert len(trickled) >= most
    received = [bytearray() for _ in range(clients)]
    open_ = dict(
        enumerate(
            socket.create_connection((server.host, server.port), TIMEOUT) for _ in range(clients)
        )
    )
    try:
        for sock in open_.values():
            sock.sendall(prefix)
        started = time.monotonic()
        sent = 0
        next_byte = started  # when the next trickled byte is due
        while open_:
            if time.monotonic() >= next_byte:
                if sent == most:
                    break
                for sock in open_.values():
                    with contextlib.suppress(OSError):  # the server may have closed it
                        sock.send(trickled[sent : sent + 1])
                sent += 1
                next_byte = time.monotonic() + TRICKLE_INTERVAL
            wait = max(0.0, next_byte - time.monotonic())
            readable, _, _ = select.select(list(open_.values()), [], [], wait)
            for index, sock in list(open_.items()):
                if sock in readable:
                    try:
                        data = sock.recv(65536)
                    except ConnectionResetError:
                        data = b""
                    received[index] += data
                    if not data:
                        sock.close()
                        del open_[index]
        elapsed = time.monotonic() - started
        assert not open_, (
            f"{len(open_)} trickling connections still open after {sent} bytes in {elapsed:.1f} s"
        )
    finally:
        for sock in open_.values():
            sock.close()
    return [bytes(data) for data in received]


HEAD = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"


@pytest.mark.parametrize(
    ("prefix", "trickled"),
    [
        pytest.param(b"", b"GET /multiply?x=1&y=2 HTTP/1.1\r\nX-Pad: " + b"a" * 100, id="head"),
        pytest.param(HEAD + b"Content-Length: 200\r\n\r\n", b"s=" + b"a" * 198, id="body"),
        pytest.param(
            b"GET /multiply?x=1&y=2 HTTP/1.1\r\nHost: x\r\n\r\nGET /multiply?x=3",
            b"&y=4 HTTP/1.1\r\nX-Pad: " + b"a" * 100,
            id="pipelined-after-a-whole-request",
        ),
    ],
)
def test_a_trickled_request_gets_408_after_request_timeout(prefix: bytes, trickled: bytes) -> None:
    # idle_timeout is far away: each byte arrives within it, so only request_timeout can end this
    with make_app().server(port=0, idle_timeout=60.0, request_timeout=1.0) as server:
        answers = trickle(server, prefix, trickled, clients=20)
        wait_until(lambda: open_connections(server) == 0, "the server threads were not freed")
    for raw in answers:
        if prefix.startswith(b"GET"):  # the whole request before the trickled one is answered
            first, _, raw = raw.partition(b"}")
            assert first.startswith(b"HTTP/1.1 200 OK\r\n")
        status_line, headers, envelope = split_response(raw)
        assert status_line == "HTTP/1.1 408 Request Timeout"
        assert headers["connection"] == "close"
        assert envelope["status"] == "failure"
        assert "request_timeout" in envelope["reason"]


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"GET /multiply?x=1&y=2 HTTP/1.1\r\nHost", id="mid-head"),
        pytest.param(HEAD + b"Content-Length: 20\r\n\r\ns=abc", id="mid-body"),
    ],
)
def test_a_request_stalled_midway_gets_408_after_idle_timeout(sent: bytes) -> None:
    with make_app().server(port=0, idle_timeout=0.3, request_timeout=60.0) as server:
        raw = raw_exchange(server, sent)
    status_line, headers, envelope = split_response(raw)
    assert status_line == "HTTP/1.1 408 Request Timeout"
    assert headers["connection"] == "close"
    assert "idle_timeout" in envelope["reason"]


def test_request_timeout_starts_with_a_request_already_buffered() -> None:
    # the start of the second request arrives with the first: its clock starts when the
    # server turns to it, not when more bytes come (which would first wait idle_timeout)
    with make_app().server(port=0, idle_timeout=5.0, request_timeout=0.5) as server:
        raw = raw_exchange(server, b"GET /multiply?x=1&y=2 HTTP/1.1\r\nHost: x\r\n\r\nGET /mul")
    first, _, raw = raw.partition(b"}")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    status_line, _, envelope = split_response(raw)
    assert status_line == "HTTP/1.1 408 Request Timeout"
    assert "request_timeout" in envelope["reason"]


def test_request_timeout_bounds_each_request_not_the_connection() -> None:
    with make_app().server(port=0, request_timeout=0.3) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
        try:
            assert call(conn, "GET", "/multiply?x=2&y=3")[1]["retval"] == 6
            time.sleep(0.6)  # idle between requests: idle_timeout's business, not request_timeout's
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            assert call(conn, "POST", "/echo", "s=again", form)[1]["retval"] == "again"
        finally:
            conn.close()
        assert server.stats.connections_opened == 1


@pytest.mark.parametrize("request_timeout", [0, -1.0])
def test_bad_request_timeout(request_timeout: float) -> None:
    with pytest.raises(ValueError, match="request_timeout"):
        make_app().server(request_timeout=request_timeout)


# -- lifecycle --------------------------------------------------------------------------


def test_url_and_port() -> None:
    server = make_app().server(port=0)
    assert server.port == 0
    with server:
        assert server.port != 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert repr(server).startswith("TaskServer('http://127.0.0.1:")


def test_start_twice_is_an_error(server: TaskServer) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_serve_forever_stops_from_another_thread() -> None:
    server = make_app().server(port=0).listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
        try:
            assert call(conn, "GET", "/multiply?x=2&y=2")[1]["retval"] == 4
        finally:
            conn.close()
    finally:
        server.stop()
        thread.join(TIMEOUT)
    assert not thread.is_alive()


def test_bad_idle_timeout() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        make_app().server(idle_timeout=0)


SERVE_SCRIPT = textwrap.dedent(
    """
    from dispatchkit.server import TaskApp
    app = TaskApp()

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    app.serve(port=0)
    print("stopped", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery differs on Windows")
def test_serve_prints_the_url_and_stops_on_ctrl_c() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT], stdout=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("Serving 1 tasks on http://127.0.0.1:")
            port = int(line.rsplit(":", 1)[1].rstrip("/\n"))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            try:
                assert call(conn, "GET", "/multiply?x=3&y=5")[1]["retval"] == 15
            finally:
                conn.close()
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(TIMEOUT)
    assert process.returncode == 0
    assert out == "stopped\n"


SS = shutil.which("ss")


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on 127.0.0.1:``port``: ``ss`` shows it as Send-Q."""
    shown = subprocess.run(
        [str(SS), "-Hltn", f"sport = :{port}"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    (line,) = shown.splitlines()
    return int(line.split()[2])


@pytest.mark.skipif(not LINUX or SS is None, reason="reads the backlog with Linux's ss")
def test_the_default_backlog_is_1024() -> None:
    with make_app().server(port=0) as server:
        assert listen_backlog(server.port) == min(1024, somaxconn())


BACKLOG_TASKS_MODULE = """
from dispatchkit.server import TaskApp

app = TaskApp()


@app.task
def multiply(x: int, y: int) -> int:
    return x * y
"""


@pytest.mark.skipif(not LINUX or SS is None, reason="reads the backlog with Linux's ss")
def test_serve_command_takes_a_backlog(tmp_path: Path) -> None:
    (tmp_path / "backlog_tasks_mod.py").write_text(BACKLOG_TASKS_MODULE)
    argv = [sys.executable, "-m", "dispatchkit", "serve", "backlog_tasks_mod:app", "--port", "0"]
    with subprocess.Popen(
        [*argv, "--backlog", "77"], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            readable, _, _ = select.select([process.stdout], [], [], TIMEOUT)
            assert readable, "no output from `dispatchkit serve` in time"
            line = process.stdout.readline()
            assert line.startswith("Serving 1 task on http://127.0.0.1:"), line
            port = int(line.rsplit(":", 1)[1].rstrip("/\n"))
            assert listen_backlog(port) == 77
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(TIMEOUT)
    assert process.returncode == 0
    refused = subprocess.run(
        [*argv, "--backlog", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert refused.returncode == 2
    assert "--backlog: must be 1 to 65535: '0'" in refused.stderr


# -- WSGI compliance --------------------------------------------------------------------


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def wsgiref_url() -> Iterator[tuple[str, int]]:
    """TaskApp behind wsgiref.validate.validator on the stdlib reference server."""
    httpd = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, validator(make_app()), handler_class=_QuietHandler
    )
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield "127.0.0.1", httpd.server_port
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "status"),
    [
        ("GET", "/multiply?x=2&y=3", None, None, 200),
        ("POST", "/multiply", "x=2&y=3", "application/x-www-form-urlencoded", 200),
        ("POST", "/multiply?x=2", '{"y": 3}', "application/json", 200),
        ("GET", "/multiply?x=a&y=3", None, None, 400),
        ("POST", "/multiply", "[1]", "application/json", 400),
        ("GET", "/nope", None, None, 404),
        ("PUT", "/multiply", "x=1", "application/x-www-form-urlencoded", 405),
        ("GET", "/boom", None, None, 500),
        ("GET", "/", None, None, 200),
        ("HEAD", "/multiply?x=1&y=1", None, None, 200),
    ],
)
def test_app_passes_wsgiref_validator(
    wsgiref_url: tuple[str, int],
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    body: str | None,
    content_type: str | None,
    status: int,
) -> None:
    conn = http.client.HTTPConnection(*wsgiref_url, timeout=TIMEOUT)
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        with caplog.at_level("CRITICAL", logger="dispatchkit.server"):
            response, envelope = call(conn, method, path, body, headers)
    finally:
        conn.close()
    assert response.status == status
    assert response.getheader("Content-Type") == "application/json"
    if method != "HEAD":
        assert envelope["status"] == ("success" if status == 200 else "failure")
