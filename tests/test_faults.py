"""Fault injection: what a call does when the server or the network misbehaves.

Every fault is played by a socket-level scripted server on 127.0.0.1
(``support.scripted_server``), so the bytes on the wire are exactly the ones
named here, and the tests assert on the server's counters (connections
accepted, requests read with their bodies) rather than on timing. The
behaviour each test pins down is described in ``docs/reliability.md``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from typing import Any

import pytest

from dispatchkit import (
    Dispatcher,
    DispatchTimeout,
    Request,
    TransportError,
)
from dispatchkit.builtin.transport import PoolTransport
from dispatchkit.server import TaskApp, TaskServer
from support.scripted_server import (
    Connection,
    RawRequest,
    ScriptedServer,
    close,
    envelope,
    per_connection,
    read,
    reset,
    respond,
    response,
    send,
    serve,
    sleep,
    wait,
)

OK = envelope("ok")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def free_port() -> int:
    """A port nothing listens on (the kernel just handed it out and took it back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def pools(d: Dispatcher) -> list[str]:
    """The origins whose pools the Dispatcher's transport keeps, least recently used first.

    There is no public way to see them: this reads ``Dispatcher._transports``
    and ``PoolTransport._pools`` (see docs/reliability.md).
    """
    transport = d._transports["http"]
    assert isinstance(transport, PoolTransport)
    return list(transport._pools)


def echo_body(request: RawRequest) -> bytes:
    """Answer a success envelope whose retval is the request's body, or its target for a GET."""
    text = request.body.decode() if request.method != "GET" else request.target
    return response(200, envelope(text))


def call(d: Dispatcher, base: str, method: str, x: int) -> Any:
    return d.apply(f"{base}/t", method, {"x": x}, task_id=f"task-{method}-{x}")


def keys(server: ScriptedServer) -> list[str]:
    return [r.headers["idempotency-key"] for r in server.requests]


# -- a pooled keep-alive connection closed by the server between calls ---------------


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_idle_connection_closed_by_the_server_is_replaced_silently(
    make_dispatcher: Any, method: str, how: str
) -> None:
    """urllib3 polls a pooled connection before reusing it: a closed one is replaced.

    The request then goes out once, on a fresh connection, for every method.
    """
    first_done = threading.Event()
    ending = close() if how == "fin" else reset()
    script = per_connection(
        [read(), respond(body=OK), wait(first_done), ending], then=[serve(echo_body)]
    )
    with ScriptedServer(script) as server:
        d = make_dispatcher()
        assert call(d, server.url, method, 1) == "ok"
        first_done.set()
        assert server.wait_until(lambda s: s.counts["closed_by_script"] >= 1, timeout=5)
        # The FIN (or RST) is in flight on loopback for a moment; give it time to land,
        # else the next request could race it (that race is the next test).
        time.sleep(0.1)
        retval = call(d, server.url, method, 2)
        assert retval == ("x=2" if method == "POST" else "/t?x=2")
        assert server.connections_accepted == 2
        assert [r.connection for r in server.requests] == [0, 1]
        assert keys(server) == [f"task-{method}-1", f"task-{method}-2"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_connection_closed_after_the_request_arrived(make_dispatcher: Any, method: str) -> None:
    """The server closes just as the next request arrives (the close raced the request).

    The request may have run, so a GET is retried on a fresh connection with the
    same Idempotency-Key, and a POST is not: TransportError, its body seen once.
    """
    script = per_connection([read(), respond(body=OK), read(), close()], then=[serve(echo_body)])
    with ScriptedServer(script) as server:
        d = make_dispatcher()
        assert call(d, server.url, method, 1) == "ok"
        if method == "GET":
            assert call(d, server.url, method, 2) == "/t?x=2"
            assert keys(server) == ["task-GET-1", "task-GET-2", "task-GET-2"]
            assert server.connections_accepted == 2
        else:
            with pytest.raises(TransportError) as info:
                call(d, server.url, method, 2)
            assert info.value.transient
            assert server.bodies("POST") == [b"x=1", b"x=2"]  # x=2 arrived exactly once
            assert server.connections_accepted == 1


# -- a connection reset in the middle of the answer --------------------------------

PARTIAL = {
    "mid-headers": b"HTTP/1.1 200 OK\r\nContent-Type: applic",
    "mid-body": response(200, OK, content_length=len(OK) + 10)[:-10],
}


@pytest.mark.parametrize("where", sorted(PARTIAL))
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_reset_mid_answer(make_dispatcher: Any, method: str, where: str) -> None:
    """A RST part-way through the answer: a GET is retried per policy, a POST is not."""
    broken = [read(), send(PARTIAL[where]), sleep(0.1), reset()]
    with ScriptedServer(per_connection(broken, then=[serve(echo_body)])) as server:
        d = make_dispatcher()
        if method == "GET":
            assert call(d, server.url, method, 1) == "/t?x=1"
            assert keys(server) == ["task-GET-1", "task-GET-1"]
        else:
            with pytest.raises(TransportError) as info:
                call(d, server.url, method, 1)
            assert not isinstance(info.value, DispatchTimeout)
            assert server.bodies() == [b"x=1"]
            assert server.connections_accepted == 1


def test_reset_on_every_attempt_exhausts_the_policy(make_dispatcher: Any) -> None:
    broken = [read(), send(PARTIAL["mid-body"]), sleep(0.1), reset()]
    with ScriptedServer(broken) as server:
        d = make_dispatcher(retry_attempts=3)
        with pytest.raises(TransportError) as info:
            call(d, server.url, "GET", 1)
        assert info.value.transient
        assert info.value.task_id == "task-GET-1"
        assert keys(server) == ["task-GET-1"] * 3
        assert server.connections_accepted == 3


# -- slow loris: an answer trickled one byte at a time ---------------------------


def test_timeout_is_per_socket_operation_not_per_call(make_dispatcher: Any) -> None:
    """``timeout`` bounds each read, not the whole answer.

    Each byte arrives well within ``timeout`` (0.5 s), so the answer, trickled
    over about 1.8 s, is read to the end: it is within the attempt's total
    ``deadline`` (by default six times ``timeout``, 3 s here).
    """
    answer = response(200, envelope(1))
    script = [read(), send(answer[:-10]), lambda c: c.trickle(answer[-10:], 0.2), sleep(5)]
    with ScriptedServer(script) as server:
        d = make_dispatcher(timeout=0.5, retry_attempts=1)
        started = time.monotonic()
        assert d.call(f"{server.url}/t") == 1
        assert time.monotonic() - started >= 1.7


@pytest.mark.parametrize(
    ("settings", "bound"),
    [
        pytest.param({"timeout": 1.0, "deadline": 1.0}, 1.0, id="deadline"),
        pytest.param({"timeout": 0.25}, 6 * 0.25, id="default-6x-timeout"),
    ],
)
@pytest.mark.parametrize("part", ["head", "body"])
def test_trickled_answer_is_bounded_by_the_total_deadline(
    make_dispatcher: Any, part: str, settings: dict[str, float], bound: float
) -> None:
    """A server trickling one byte every 0.2 s (never idle for ``timeout``) is cut off.

    The bound is the feature under test, so it is asserted, with slack for a
    loaded machine: the call must end by 3x the deadline (the server would
    trickle for 8 s), with a DispatchTimeout.
    """
    answer = response(200, envelope("x" * 100))
    # cut inside the header block (after the status line), or inside the body
    split = answer.index(b"\r\n") + 7 if part == "head" else answer.index(b"\r\n\r\n") + 10
    script = [read(), send(answer[:split]), lambda c: c.trickle(answer[split:], 0.2)]
    with ScriptedServer(script, connection_deadline=8) as server:
        d = make_dispatcher(retry_attempts=1, **settings)
        started = time.monotonic()
        with pytest.raises(DispatchTimeout, match="deadline"):
            d.call(f"{server.url}/t")
        assert time.monotonic() - started <= 3 * bound


# -- truncated answers: never a hang, never a partial envelope ----------------------

HEAD_CUTS = {
    "status-line": b"HTTP/1.1 200 O",
    "in-a-header": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Len",
    "no-blank-line": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
    "503-status-line": b"HTTP/1.1 503 Serv",
    "after-content-length-0": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Ty",
    "503-after-content-length-0": (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-Af"
    ),
    "http-1.0-status-line": b"HTTP/1.0 200 O",
}


@pytest.mark.parametrize("cut", sorted(HEAD_CUTS))
def test_head_cut_by_a_close_is_a_transport_error(make_dispatcher: Any, cut: str) -> None:
    """The server closes (FIN) before the end of the status line or the header block.

    Nothing complete came back, as with a reset mid-headers: a TransportError,
    which a GET retries.
    """
    with ScriptedServer([read(), send(HEAD_CUTS[cut]), close()]) as server:
        d = make_dispatcher(retry_attempts=1)
        with pytest.raises(TransportError):
            d.call(f"{server.url}/t")


FULL_THEN_CUT = {
    # the whole envelope arrives, but Content-Length promised more
    "short-content-length": response(200, OK, content_length=len(OK) + 50),
    # a complete chunk holding the whole envelope, no terminating zero-size chunk
    "chunked-no-last-chunk": response(
        200, b"%x\r\n%s\r\n" % (len(OK), OK), [("Transfer-Encoding", "chunked")]
    ),
    # cut inside a chunk's data
    "chunked-mid-chunk": response(
        200, b"%x\r\n%s" % (len(OK) + 20, OK), [("Transfer-Encoding", "chunked")]
    ),
    # cut inside a chunk-size line
    "chunked-mid-size": response(
        200, b"%x\r\n%s\r\n1" % (len(OK), OK), [("Transfer-Encoding", "chunked")]
    ),
}


@pytest.mark.parametrize("case", sorted(FULL_THEN_CUT))
def test_truncated_body_then_close_is_a_transport_error(make_dispatcher: Any, case: str) -> None:
    """The connection closes before the body is complete: TransportError, not the envelope."""
    script = [read(), send(FULL_THEN_CUT[case]), close()]
    with ScriptedServer(script) as server:
        d = make_dispatcher(retry_attempts=1)
        with pytest.raises(TransportError) as info:
            d.call(f"{server.url}/t")
        assert type(info.value) is TransportError
        assert info.value.transient


@pytest.mark.parametrize("case", sorted(FULL_THEN_CUT))
def test_truncated_body_on_an_open_connection_times_out(make_dispatcher: Any, case: str) -> None:
    """The rest of the body never comes and the connection stays open: a read timeout."""
    script = [read(), send(FULL_THEN_CUT[case]), sleep(8)]
    with ScriptedServer(script) as server:
        d = make_dispatcher(timeout=0.5, retry_attempts=1)
        with pytest.raises(DispatchTimeout):
            d.call(f"{server.url}/t")


def test_a_truncated_get_is_retried_and_a_post_is_not(make_dispatcher: Any) -> None:
    cut = [read(), send(FULL_THEN_CUT["short-content-length"]), close()]
    with ScriptedServer(per_connection(cut, cut, then=[serve(echo_body)])) as server:
        d = make_dispatcher()
        with pytest.raises(TransportError):
            call(d, server.url, "POST", 1)
        assert call(d, server.url, "GET", 2) == "/t?x=2"
        assert keys(server) == ["task-POST-1", "task-GET-2", "task-GET-2"]


def test_a_whole_chunked_answer_is_accepted(make_dispatcher: Any) -> None:
    """The control case for the cut-off chunked answers above."""
    body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, OK[:5], len(OK) - 5, OK[5:])
    chunked = response(200, body, [("Transfer-Encoding", "chunked")])
    with ScriptedServer([read(), send(chunked), close()]) as server:
        assert make_dispatcher().call(f"{server.url}/t") == "ok"


# -- Retry-After, as raw header bytes ------------------------------------------------
# tests/test_retry.py covers plain seconds, an RFC 1123 date, a cap and garbage
# against the Node peer; these are the forms only a raw socket sends.


def retry_after_script(*lines: bytes) -> Callable[[Connection], None]:
    """The first request gets a 503 with the given raw header lines; later ones succeed."""
    head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n" + b"".join(
        line + b"\r\n" for line in lines
    )

    def run(conn: Connection) -> None:
        while (request := conn.read_request()) is not None:
            first = sum(r.target == request.target for r in conn.server.requests) == 1
            conn.send(head + b"\r\n" if first else response(200, OK))

    return run


def gap(server: ScriptedServer) -> float:
    first, second = server.requests[:2]
    return second.received_at - first.received_at


def in_two_seconds() -> bytes:
    # computed when the test runs, not when it is collected
    return formatdate(time.time() + 2, usegmt=True).encode()  # 1 s resolution: waits 1-2 s


@pytest.mark.parametrize(
    ("value", "at_least"),
    [
        pytest.param(lambda: b"retry-after:    1   ", 0.9, id="lower-case-padded"),
        pytest.param(lambda: b"Retry-After: " + in_two_seconds(), 0.9, id="imf-date"),
        pytest.param(lambda: b"Retry-After: Sunday, 06-Nov-94 08:49:37 GMT", 0.0, id="rfc850"),
        pytest.param(lambda: b"Retry-After: 0", 0.0, id="zero"),
    ],
)
def test_retry_after_is_honoured(
    make_dispatcher: Any, value: Callable[[], bytes], at_least: float
) -> None:
    with ScriptedServer(retry_after_script(value())) as server:
        d = make_dispatcher()
        assert d.call(f"{server.url}/t", n=1) == "ok"
        assert len(server.requests) == 2
        assert gap(server) >= at_least


@pytest.mark.parametrize(
    "value",
    [
        b"9" * 400,  # parses as float("inf")
        b"Fri, 31 Dec 9999 23:59:59 GMT",
    ],
)
def test_absurd_retry_after_is_capped(make_dispatcher: Any, value: bytes) -> None:
    """The cap is the feature: the wait is at least the cap and finite (well under 5 s)."""
    with ScriptedServer(retry_after_script(b"Retry-After: " + value)) as server:
        d = make_dispatcher(retry_after_cap=0.3)
        assert d.call(f"{server.url}/t", n=1) == "ok"
        assert 0.25 <= gap(server) <= 5


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"soon",
        b"-5",
        b"1.5",
        b"0x10",
        b"1, 2",
        b"Sun Nov  6 08:49:37 1994",  # asctime: no zone, ignored (see docs/protocol.md)
        b"\xff\xfe",
        b"\xb2",  # latin-1 superscript two: "\xb2".isdigit() is True, float() refuses it
    ],
)
def test_garbage_retry_after_is_ignored(make_dispatcher: Any, value: bytes) -> None:
    """An unusable value falls back to the backoff: the call is retried and succeeds."""
    with ScriptedServer(retry_after_script(b"Retry-After: " + value)) as server:
        d = make_dispatcher(retry_backoff=0.01)
        assert d.call(f"{server.url}/t", n=1) == "ok"
        assert len(server.requests) == 2


def test_duplicate_retry_after_headers_the_last_counts(make_dispatcher: Any) -> None:
    """Two Retry-After headers (invalid, but sent): the last is used, and nothing breaks."""
    script = retry_after_script(b"Retry-After: soon", b"Retry-After: 1")
    with ScriptedServer(script) as server:
        assert make_dispatcher().call(f"{server.url}/t", n=1) == "ok"
        assert len(server.requests) == 2
        assert gap(server) >= 0.9


# -- many hosts: bounded pools, least recently used closed ---------------------------


@pytest.fixture(scope="module")
def task_servers() -> Iterator[list[TaskServer]]:
    app = TaskApp()

    @app.task
    def echo(x: int) -> int:
        return x

    servers = [app.server(port=0, idle_timeout=30).start() for _ in range(4)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def wait_for_fds(target: int, timeout: float = 5.0) -> int:
    """Poll until the fd count is at most ``target`` (servers close their ends in threads)."""
    deadline = time.monotonic() + timeout
    while (count := fd_count()) > target and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


def test_10000_hosts_keep_pools_and_fds_bounded(
    make_dispatcher: Any, task_servers: list[TaskServer]
) -> None:
    """10,000 distinct origins (127.x.y.z, a refused port) among four real servers.

    A refused connect still creates a pool. With ``max_pools=16`` at most 16
    are kept; a real server visited again after 500 other hosts finds its pool
    evicted and closed (a new connection each visit), and the fds in use stay
    bounded while the calls run and return to where they were after.
    """
    port = free_port()
    for server in task_servers:
        server.stats.reset()
    d = make_dispatcher(max_pools=16, retry_attempts=1, timeout=2)
    before = fd_count()
    peak = before
    rounds = 0
    for i in range(10_000):
        origin = f"http://127.{1 + i // 65536}.{i // 256 % 256}.{i % 256}:{port}"
        with pytest.raises(TransportError):  # ConnectError: refused
            d.call(f"{origin}/t")
        if i % 500 == 0:
            rounds += 1
            for server in task_servers:
                assert d.call(f"{server.url}/echo", x=i) == i
            peak = max(peak, fd_count())
        assert len(pools(d)) <= 16
    assert len(pools(d)) == 16
    # Each visit found the pool evicted (500 > 16 other hosts since) and connected again.
    assert [s.stats.connections_opened for s in task_servers] == [rounds] * len(task_servers)
    # Had evicted pools kept their sockets: 20 rounds x 4 servers x 2 ends = 160 fds.
    assert peak - before <= 2 * len(task_servers) + 8
    d.close()
    assert wait_for_fds(before) <= before


def test_least_recently_used_pools_are_kept_warm(make_dispatcher: Any) -> None:
    """Eviction is by recency of use, not by age: pools in use are never closed."""
    port = free_port()
    servers = [ScriptedServer([serve()]) for _ in range(3)]
    for server in servers:
        server.start()
    try:
        d = make_dispatcher(max_pools=4, retry_attempts=1)
        for i in range(200):
            with pytest.raises(TransportError):
                d.call(f"http://127.2.{i // 256}.{i % 256}:{port}/t")
            for server in servers:  # three warm pools plus one refused host: four
                assert d.call(server.url, "POST", x=i) == f"x={i}"
        assert [s.connections_accepted for s in servers] == [1, 1, 1]
        assert [s.peer_closed for s in servers] == [0, 0, 0]
        # Four other hosts in a row push all three out: their connections are closed.
        for i in range(4):
            with pytest.raises(TransportError):
                d.call(f"http://127.3.0.{i}:{port}/t")
        for server in servers:
            assert server.wait_until(lambda s: s.peer_closed == 1, timeout=5)
            assert d.call(server.url, "POST", x=1) == "x=1"
            assert server.connections_accepted == 2
    finally:
        for server in servers:
            server.stop()


def test_post_survives_its_pool_being_evicted_before_use(
    make_dispatcher: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread evicts the pool between its lookup and its use; nothing was sent yet.

    The race is made deterministic by evicting from inside the lookup (the only
    monkeypatching in this file; the sockets stay real).
    """
    with ScriptedServer([serve()]) as a, ScriptedServer([serve()]) as b:
        lookup = PoolTransport._pool_for
        evicted: list[str] = []

        def racy_lookup(self: PoolTransport, origin: str, request: Request) -> Any:
            entry = lookup(self, origin, request)
            if origin == a.url and not evicted:
                evicted.append(origin)
                lookup(self, b.url, request)  # "another thread" calls b: a's pool is closed
            return entry

        monkeypatch.setattr(PoolTransport, "_pool_for", racy_lookup)
        d = make_dispatcher(max_pools=1)
        assert d.call(a.url, "POST", x=1) == "x=1"
        assert evicted == [a.url]  # the race was staged
        assert a.bodies() == [b"x=1"]


# -- odds and ends ------------------------------------------------------------------


def test_garbage_instead_of_a_status_line(make_dispatcher: Any) -> None:
    """Not HTTP at all (an SSH banner): a broken connection, not a response."""
    with ScriptedServer([read(), send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), close()]) as server:
        d = make_dispatcher(retry_attempts=1)
        with pytest.raises(TransportError, match="BadStatusLine"):
            d.call(f"{server.url}/t")


def test_folded_and_odd_headers_are_read_like_http_client(make_dispatcher: Any) -> None:
    """The transport's own head reader: folded lines, spacing, a 100 Continue first."""
    body = envelope("ok")
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type:application/json\r\n"
        b"X-Folded: one\r\n two\r\n"
        b"Content-Length:  " + str(len(body)).encode() + b"  \r\n\r\n" + body
    )
    with ScriptedServer([read(), send(answer), sleep(1)]) as server:
        d = make_dispatcher(retry_attempts=1)
        assert d.call(f"{server.url}/t") == "ok"


def test_too_many_headers_are_refused(make_dispatcher: Any) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    answer = b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 0\r\n\r\n"
    with ScriptedServer([read(), send(answer), sleep(1)]) as server:
        d = make_dispatcher(retry_attempts=1)
        with pytest.raises(TransportError, match="100 headers"):
            d.call(f"{server.url}/t")
