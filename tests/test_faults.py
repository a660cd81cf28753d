"""Fault injection the sync Dispatcher alone can be put through: its urllib3 pools, its
head reader, and Retry-After as raw header bytes.

The fault table both drivers share (closed and reset connections, slow loris,
truncated answers, connection refused) is ``tests/test_async_faults.py``. Every
fault here is played by a socket-level scripted server on 127.0.0.1
(``support.scripted_server``), so the bytes on the wire are exactly the ones
named here, and the tests assert on the server's counters (connections
accepted, requests read with their bodies) rather than on timing. The
behaviour each test pins down is described in ``docs/reliability.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from typing import Any

import pytest

from dispatchkit import Dispatcher, Request, TransportError
from dispatchkit.builtin.transport import PoolTransport
from dispatchkit.server import TaskApp, TaskServer
from support.probes import free_port
from support.scripted_server import (
    Connection,
    ScriptedServer,
    envelope,
    read,
    response,
    send,
    serve,
    sleep,
)

OK = envelope("ok")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def pools(d: Dispatcher) -> list[str]:
    """The origins whose pools the Dispatcher's transport keeps, least recently used first.

    There is no public way to see them: this reads ``Dispatcher._transports``
    and ``PoolTransport._pools`` (see docs/reliability.md).
    """
    transport = d._transports["http"]
    assert isinstance(transport, PoolTransport)
    return list(transport._pools)


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


# -- the transport's own head reader (the async one is aiohttp's) ------------------


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
