"""The fault table of docs/reliability.md, run against both dispatchers.

Every test takes ``new_client``, parametrized over the sync
:class:`~dispatchkit.Dispatcher` and the :class:`~dispatchkit.AsyncDispatcher`
(``support.drivers``): one table, so the two cannot drift apart. The faults
are played by the socket-level scripted server on 127.0.0.1, the Node.js
peer, and a trustme-certified HTTPS server (``support.tls``); the tests
assert on the servers' counters, never on how fast anything was. Where the
two drivers must differ (urllib3 warns on ``verify=False``), the test says
so. What only the sync driver has (urllib3's pools, its head reader,
http.client parity) stays in ``tests/test_faults.py`` and
``tests/test_hostile.py``.
"""

from __future__ import annotations

import gc
import ssl
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from urllib3.exceptions import InsecureRequestWarning

from dispatchkit import (
    ConnectError,
    DispatchError,
    DispatchTimeout,
    EgressDenied,
    HTTPStatusError,
    InvalidResponseError,
    Request,
    ResponseTooLargeError,
    TransportError,
    UsageError,
    hookimpl,
)
from support.bombs import BOMBS, MIB, deflate, gzip_data, have
from support.drivers import DRIVERS, Client, SyncClient, make_client
from support.probes import Attempts, free_port
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
from support.tls import Pems, Server, https_server, server_context, write_pems

OK = envelope("ok")
MakeClient = Callable[..., Client]


@pytest.fixture(params=DRIVERS)
def new_client(request: pytest.FixtureRequest) -> Iterator[MakeClient]:
    """Build clients of one driver (the test runs once per driver); all closed after."""
    made: list[Client] = []

    def make(**settings: Any) -> Client:
        settings.setdefault("timeout", 5)
        settings.setdefault("retry_backoff", 0.01)
        client = make_client(request.param, **settings)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def echo_body(request: RawRequest) -> bytes:
    """A success envelope whose retval is the request's body, or its target for a GET."""
    text = request.body.decode() if request.method != "GET" else request.target
    return response(200, envelope(text))


def call(c: Client, base: str, method: str, x: int) -> Any:
    return c.apply(f"{base}/t", method, {"x": x}, task_id=f"task-{method}-{x}")


def keys(server: ScriptedServer) -> list[str]:
    return [r.headers["idempotency-key"] for r in server.requests]


# -- a pooled keep-alive connection closed by the server between calls -------------------


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_idle_connection_closed_by_the_server_is_replaced_silently(
    new_client: MakeClient, method: str, how: str
) -> None:
    first_done = threading.Event()
    ending = close() if how == "fin" else reset()
    script = per_connection(
        [read(), respond(body=OK), wait(first_done), ending], then=[serve(echo_body)]
    )
    with ScriptedServer(script) as server:
        c = new_client()
        assert call(c, server.url, method, 1) == "ok"
        first_done.set()
        assert server.wait_until(lambda s: s.counts["closed_by_script"] >= 1, timeout=5)
        c.pause(0.1)  # the FIN (or RST) lands while the client is idle
        assert call(c, server.url, method, 2) == ("x=2" if method == "POST" else "/t?x=2")
        assert server.connections_accepted == 2
        assert [r.connection for r in server.requests] == [0, 1]
        assert keys(server) == [f"task-{method}-1", f"task-{method}-2"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_connection_closed_after_the_request_arrived(new_client: MakeClient, method: str) -> None:
    """The close raced the request: a GET is retried with the same key, a POST is not."""
    script = per_connection([read(), respond(body=OK), read(), close()], then=[serve(echo_body)])
    with ScriptedServer(script) as server:
        c = new_client()
        assert call(c, server.url, method, 1) == "ok"
        if method == "GET":
            assert call(c, server.url, method, 2) == "/t?x=2"
            assert keys(server) == ["task-GET-1", "task-GET-2", "task-GET-2"]
            assert server.connections_accepted == 2
        else:
            with pytest.raises(TransportError) as info:
                call(c, server.url, method, 2)
            assert info.value.transient
            assert server.bodies("POST") == [b"x=1", b"x=2"]  # x=2 arrived exactly once
            assert server.connections_accepted == 1


# -- a connection reset in the middle of the answer ------------------------------------

PARTIAL = {
    "mid-headers": b"HTTP/1.1 200 OK\r\nContent-Type: applic",
    "mid-body": response(200, OK, content_length=len(OK) + 10)[:-10],
}


@pytest.mark.parametrize("where", sorted(PARTIAL))
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_reset_mid_answer(new_client: MakeClient, method: str, where: str) -> None:
    broken = [read(), send(PARTIAL[where]), sleep(0.1), reset()]
    with ScriptedServer(per_connection(broken, then=[serve(echo_body)])) as server:
        c = new_client()
        if method == "GET":
            assert call(c, server.url, method, 1) == "/t?x=1"
            assert keys(server) == ["task-GET-1", "task-GET-1"]
        else:
            with pytest.raises(TransportError) as info:
                call(c, server.url, method, 1)
            assert not isinstance(info.value, DispatchTimeout)
            assert server.bodies() == [b"x=1"]
            assert server.connections_accepted == 1


def test_reset_on_every_attempt_exhausts_the_policy(new_client: MakeClient) -> None:
    broken = [read(), send(PARTIAL["mid-body"]), sleep(0.1), reset()]
    with ScriptedServer(broken) as server:
        c = new_client(retry_attempts=3)
        with pytest.raises(TransportError) as info:
            call(c, server.url, "GET", 1)
        assert info.value.transient
        assert info.value.task_id == "task-GET-1"
        assert keys(server) == ["task-GET-1"] * 3
        assert server.connections_accepted == 3


# -- slow loris ---------------------------------------------------------------------------


def test_timeout_is_per_socket_operation_not_per_call(new_client: MakeClient) -> None:
    """``timeout`` bounds each read, not the whole answer.

    Each byte arrives well within ``timeout`` (0.5 s), so the answer, trickled
    over about 1.8 s, is read to the end: it is within the attempt's total
    ``deadline`` (by default six times ``timeout``, 3 s here).
    """
    answer = response(200, envelope(1))
    script = [read(), send(answer[:-10]), lambda c: c.trickle(answer[-10:], 0.2), sleep(5)]
    with ScriptedServer(script) as server:
        c = new_client(timeout=0.5, retry_attempts=1)
        started = time.monotonic()
        assert c.call(f"{server.url}/t") == 1
        assert time.monotonic() - started >= 1.7


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"timeout": 1.0, "deadline": 1.0}, id="deadline"),
        pytest.param({"timeout": 0.25}, id="default-6x-timeout"),
    ],
)
@pytest.mark.parametrize("part", ["head", "body"])
def test_trickled_answer_is_bounded_by_the_total_deadline(
    new_client: MakeClient, part: str, settings: dict[str, float]
) -> None:
    """One byte every 0.05 s (never idle near ``timeout``), for longer than the server lets
    the connection live (8 s).

    The call ends with a DispatchTimeout naming the deadline, and it is the client
    that cuts the answer off: the server's next byte finds the connection closed
    (were it the server's own 8 s limit, its trickle would end without an error).
    """
    answer = response(200, envelope("x" * 400))
    split = answer.index(b"\r\n") + 7 if part == "head" else answer.index(b"\r\n\r\n") + 10
    cut_by_client = threading.Event()

    def script(conn: Connection) -> None:
        if conn.read_request() is None:
            return
        conn.send(answer[:split])
        try:
            conn.trickle(answer[split:], 0.05)
        except OSError:  # the client closed its end: a broken pipe or a reset
            cut_by_client.set()

    with ScriptedServer(script, connection_deadline=8) as server:
        c = new_client(retry_attempts=1, **settings)
        with pytest.raises(DispatchTimeout, match="deadline"):
            c.call(f"{server.url}/t")
        assert server.wait_until(lambda s: cut_by_client.is_set(), timeout=10)


# -- truncated answers: never a hang, never a partial envelope ----------------------------

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
def test_head_cut_by_a_close_is_a_transport_error(new_client: MakeClient, cut: str) -> None:
    with ScriptedServer([read(), send(HEAD_CUTS[cut]), close()]) as server:
        c = new_client(retry_attempts=1)
        with pytest.raises(TransportError) as info:
            c.call(f"{server.url}/t")
        assert not isinstance(info.value, DispatchTimeout)


FULL_THEN_CUT = {
    "short-content-length": response(200, OK, content_length=len(OK) + 50),
    "chunked-no-last-chunk": response(
        200, b"%x\r\n%s\r\n" % (len(OK), OK), [("Transfer-Encoding", "chunked")]
    ),
    "chunked-mid-chunk": response(
        200, b"%x\r\n%s" % (len(OK) + 20, OK), [("Transfer-Encoding", "chunked")]
    ),
    "chunked-mid-size": response(
        200, b"%x\r\n%s\r\n1" % (len(OK), OK), [("Transfer-Encoding", "chunked")]
    ),
}


@pytest.mark.parametrize("case", sorted(FULL_THEN_CUT))
def test_truncated_body_then_close_is_a_transport_error(new_client: MakeClient, case: str) -> None:
    """The body ends before its length, even with a whole envelope in it: never its value."""
    with ScriptedServer([read(), send(FULL_THEN_CUT[case]), close()]) as server:
        c = new_client(retry_attempts=1)
        with pytest.raises(TransportError) as info:
            c.call(f"{server.url}/t")
        assert type(info.value) is TransportError
        assert info.value.transient


@pytest.mark.parametrize("case", sorted(FULL_THEN_CUT))
def test_truncated_body_on_an_open_connection_times_out(new_client: MakeClient, case: str) -> None:
    with ScriptedServer([read(), send(FULL_THEN_CUT[case]), sleep(8)]) as server:
        c = new_client(timeout=0.5, retry_attempts=1)
        with pytest.raises(DispatchTimeout):
            c.call(f"{server.url}/t")


def test_a_truncated_get_is_retried_and_a_post_is_not(new_client: MakeClient) -> None:
    cut = [read(), send(FULL_THEN_CUT["short-content-length"]), close()]
    with ScriptedServer(per_connection(cut, cut, then=[serve(echo_body)])) as server:
        c = new_client()
        with pytest.raises(TransportError):
            call(c, server.url, "POST", 1)
        assert call(c, server.url, "GET", 2) == "/t?x=2"
        assert keys(server) == ["task-POST-1", "task-GET-2", "task-GET-2"]


def test_a_whole_chunked_answer_is_accepted(new_client: MakeClient) -> None:
    body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, OK[:5], len(OK) - 5, OK[5:])
    chunked = response(200, body, [("Transfer-Encoding", "chunked")])
    with ScriptedServer([read(), send(chunked), close()]) as server:
        assert new_client().call(f"{server.url}/t") == "ok"


def test_garbage_instead_of_a_status_line(new_client: MakeClient) -> None:
    """Not HTTP at all (an SSH banner): a broken connection, not a response."""
    with ScriptedServer([read(), send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), close()]) as server:
        c = new_client(retry_attempts=1)
        with pytest.raises(TransportError) as info:
            c.call(f"{server.url}/t")
        assert type(info.value) is TransportError
        # each names what it could not parse: http.client's and aiohttp's own words
        named = "BadStatusLine" if c.name == "sync" else "Bad status line"
        assert named in str(info.value), info.value


# -- interim (1xx) answers --------------------------------------------------------------

EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"


def own_key(interim: bytes) -> Callable[[RawRequest], bytes]:
    def answer(request: RawRequest) -> bytes:
        return interim + response(200, envelope(request.headers["idempotency-key"]))

    return answer


@pytest.mark.parametrize(
    "interim",
    [EARLY_HINTS, PROCESSING, PROCESSING + EARLY_HINTS + EARLY_HINTS],
    ids=["103", "102", "102-103-103"],
)
def test_interim_answers_are_skipped_and_never_answer_the_next_call(
    new_client: MakeClient, interim: bytes
) -> None:
    """Three calls on one keep-alive connection; each gets its own final answer."""
    with ScriptedServer([serve(own_key(interim))]) as server:
        c = new_client(retry_attempts=1)
        for n in range(3):
            assert c.apply(f"{server.url}/t", "GET", task_id=f"call-{n}") == f"call-{n}"
        assert server.connections_accepted == 1


def test_endless_interim_answers_are_refused(new_client: MakeClient) -> None:
    """Interim heads without end, each well within ``timeout``: refused, not waited out."""

    def script(conn: Connection) -> None:
        if conn.read_request() is None:
            return
        while True:  # until the client hangs up (or the connection's deadline)
            conn.send(EARLY_HINTS)
            conn.sleep(0.005)

    with ScriptedServer(script, connection_deadline=10) as server:
        c = new_client(retry_attempts=1, timeout=1, deadline=4)
        with pytest.raises(TransportError) as info:
            c.call(f"{server.url}/t")
        if c.name == "async":
            # aiohttp reads interim heads without a count: the attempt's deadline ends it
            # (docs/reliability.md says so).
            assert isinstance(info.value, DispatchTimeout), info.value
            assert "deadline" in str(info.value)
        else:
            assert not isinstance(info.value, DispatchTimeout), info.value
            assert "interim" in str(info.value)


def test_an_unasked_switch_of_protocols_is_an_error(new_client: MakeClient) -> None:
    """101 without an Upgrade request: the connection speaks something else now."""
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    with ScriptedServer([serve(lambda r: switch + response(200, envelope("no")))]) as server:
        c = new_client(retry_attempts=1)
        with pytest.raises(TransportError, match="101") as info:
            c.call(f"{server.url}/t", "POST")
        assert not info.value.transient


# -- compression ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BOMBS))
def test_max_response_bytes_bounds_the_decoded_body(new_client: MakeClient, name: str) -> None:
    """A few KiB that inflate to 64 MiB: refused at the limit, never held in memory.

    For every single coding both drivers give ResponseTooLargeError. A chained
    coding (``gzip, gzip``) is one aiohttp does not decode at all: the async
    driver then hands the still-encoded bytes to the codec, which refuses them
    (InvalidResponseError). Either way: never a value, never a MemoryError,
    and tracemalloc's peak stays far below the 64 MiB.
    """
    encoding, library, make = BOMBS[name]
    if library and not have(library):
        pytest.skip(f"{library} is not installed")
    bomb = make()
    assert len(bomb) < MIB
    answer = response(200, bomb, {"Content-Encoding": encoding})
    with ScriptedServer([read(), send(answer), sleep(2)]) as server:
        c = new_client(max_response_bytes=MIB, retry_attempts=1)
        tracemalloc.start()
        try:
            with pytest.raises(InvalidResponseError) as info:
                c.call(f"{server.url}/t")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        if c.name == "sync" or "," not in encoding:
            assert isinstance(info.value, ResponseTooLargeError), repr(info.value)
        assert peak < 16 * MIB


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip_data),
        ("deflate", deflate),
        ("gzip, deflate", lambda data: deflate(gzip_data(data))),
    ],
    ids=["gzip", "deflate", "gzip-deflate"],
)
def test_a_compressed_answer_within_the_limit_is_decoded(
    new_client: MakeClient, encoding: str, encode: Callable[[bytes], bytes]
) -> None:
    body = envelope("x" * 100_000)
    answer = response(200, encode(body), {"Content-Encoding": encoding})
    with ScriptedServer([read(), send(answer), sleep(1)]) as server:
        c = new_client(max_response_bytes=len(body), retry_attempts=1)
        if c.name == "async" and "," in encoding:
            # aiohttp decodes one coding: a chain is refused, said plainly (docs/reliability.md).
            with pytest.raises(InvalidResponseError, match="chain of codings"):
                c.call(f"{server.url}/t")
        else:
            assert c.call(f"{server.url}/t") == "x" * 100_000


def test_a_body_that_does_not_decode_is_an_invalid_response(new_client: MakeClient) -> None:
    answer = response(200, b"not gzip at all", {"Content-Encoding": "gzip"})
    with ScriptedServer([read(), send(answer), sleep(1)]) as server:
        c = new_client(retry_attempts=3)
        with pytest.raises(InvalidResponseError, match="decode"):
            c.call(f"{server.url}/t")
        assert len(server.requests) == 1  # the bytes are wrong, not the network: not retried


# -- connection refused ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_connect_errors_are_retried_for_every_method(new_client: MakeClient, method: str) -> None:
    attempts = Attempts()
    c = new_client(plugins=[attempts], retry_attempts=3)
    with pytest.raises(ConnectError):
        c.call(f"http://127.0.0.1:{free_port()}/task", method, x=1)
    assert attempts.numbers == [1, 2, 3]


# -- headers that cannot be sent ------------------------------------------------------------

BAD_HEADERS: dict[str, tuple[dict[str, Any], str]] = {
    "CRLF in a value": ({"X-Note": "a\r\nX-Injected: 1"}, "X-Note"),
    "LF in a value": ({"X-Note": "a\nb"}, "X-Note"),
    "NUL in a value": ({"X-Note": "a\x00b"}, "X-Note"),
    "non-latin-1 value": ({"X-Price": "€"}, "X-Price"),
    "CRLF in a name": ({"X-Bad\r\nX-Injected": "1"}, "X-Bad"),
    "space in a name": ({"Bad Name": "v"}, "Bad Name"),
    "colon in a name": ({"Bad:Name": "v"}, "Bad:Name"),
    "empty name": ({"": "v"}, "''"),
    "not a str": ({"X-Count": 3}, "X-Count"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_unsendable_headers_are_a_usage_error_before_anything_is_sent(
    new_client: MakeClient, case: str
) -> None:
    headers, named = BAD_HEADERS[case]
    with ScriptedServer([serve()]) as server:
        c = new_client()
        with pytest.raises(UsageError, match="header") as info:
            c.apply(f"{server.url}/t", "GET", headers=headers)
        assert named in str(info.value)
        if isinstance(c, SyncClient):  # apply_async (the Celery-style API) is the sync one's
            with pytest.raises(UsageError, match="header"):
                c.dispatcher.apply_async(f"{server.url}/t", "PUT", headers=headers)
        assert server.connections_accepted == 0


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_a_plugin_adding_an_unsendable_header_is_not_retried(
    new_client: MakeClient, case: str
) -> None:
    """A prepare_request hook adds the header: UsageError naming it, nothing sent, one attempt."""
    headers, named = BAD_HEADERS[case]
    attempts = Attempts()

    class Broken:
        @hookimpl
        def dispatchkit_prepare_request(self, request: Request) -> None:
            request.headers.update(headers)  # on purpose: not all of them are str

    with ScriptedServer([serve()]) as server:
        c = new_client(plugins=[attempts, Broken()])
        with pytest.raises(UsageError) as info:
            c.call(f"{server.url}/t", "GET")
        assert named in str(info.value)
        assert server.requests == []
        assert attempts.numbers == [1]


# -- redirects (the Node peer) ---------------------------------------------------------------


def test_a_redirect_is_not_followed_by_default(new_client: MakeClient, peer: str) -> None:
    c = new_client()
    with pytest.raises(HTTPStatusError, match="redirects are not followed") as info:
        c.call(f"{peer}/redirect", to="/multiply?x=6&y=7")
    assert info.value.status == 302
    assert info.value.headers["location"] == "/multiply?x=6&y=7"


def test_redirects_are_followed_when_asked(new_client: MakeClient, peer: str) -> None:
    c = new_client(follow_redirects=2)
    assert c.call(f"{peer}/redirect", to="/multiply?x=6&y=7") == 42


def test_too_many_redirects_give_the_last_3xx(new_client: MakeClient, peer: str) -> None:
    c = new_client(follow_redirects=2)
    loop = "/redirect?to=/redirect%3Fto%3D/redirect%253Fto%253D/multiply"
    with pytest.raises(HTTPStatusError) as info:
        c.call(f"{peer}{loop}")
    assert info.value.status == 302


@pytest.mark.parametrize(("code", "method"), [(303, "GET"), (302, "GET"), (307, "POST")])
def test_redirect_methods(new_client: MakeClient, peer: str, code: int, method: str) -> None:
    c = new_client(follow_redirects=1)
    echo = c.call(f"{peer}/status/{code}", "POST", location="/echo", x="1")
    assert echo["method"] == method
    assert echo["body"] == ("location=%2Fecho&x=1" if method == "POST" else "")


@pytest.mark.parametrize(
    "location", ["http://127.0.0.1:99999/t", "http://127.0.0.1:abc/t", "http://[::1/t"]
)
def test_a_redirect_to_what_is_not_a_url_is_an_invalid_response(
    new_client: MakeClient, location: str
) -> None:
    moved = response(302, b"", {"Location": location})
    with ScriptedServer([serve(lambda request: moved)]) as server:
        c = new_client(follow_redirects=1, retry_attempts=1)
        with pytest.raises(InvalidResponseError, match="the redirect's Location is not a URL"):
            c.call(f"{server.url}/t")


def test_credentials_do_not_follow_a_redirect_to_another_origin(
    new_client: MakeClient, peer: str
) -> None:
    port = peer.rpartition(":")[2]
    c = new_client(follow_redirects=1)
    same = c.apply(f"{peer}/redirect", kwargs={"to": "/echo"}, headers={"Authorization": "B t"})
    assert same["headers"]["authorization"] == "B t"
    other = c.apply(
        f"{peer}/redirect",
        kwargs={"to": f"http://localhost:{port}/echo"},
        headers={"Authorization": "B t", "Cookie": "c=1", "X-Keep": "yes"},
    )
    assert "authorization" not in other["headers"]
    assert "cookie" not in other["headers"]
    assert other["headers"]["x-keep"] == "yes"


def test_redirect_to_another_scheme_is_refused(new_client: MakeClient, peer: str) -> None:
    c = new_client(follow_redirects=1)
    with pytest.raises(UsageError, match="unsupported scheme"):
        c.call(f"{peer}/redirect", to="file:///etc/passwd")


# -- the egress policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.0.0.1", "[::ffff:127.0.0.1]"],
)
def test_public_only_refuses_before_sending(new_client: MakeClient, peer: str, host: str) -> None:
    port = peer.rpartition(":")[2]
    attempts = Attempts()
    c = new_client(egress="public", plugins=[attempts])
    plain = new_client()
    plain.call(f"{peer}/stats/reset")
    with pytest.raises(EgressDenied, match="egress policy refuses") as info:
        c.call(f"http://{host}:{port}/multiply", "POST", x=1, y=2)
    assert plain.call(f"{peer}/stats")["requests"] == 1  # only this one: nothing was sent
    assert isinstance(info.value, DispatchError)
    assert info.value.method == "POST"
    assert attempts.numbers == [1]  # not retried


def test_allow_list_by_cidr_and_by_name(new_client: MakeClient, peer: str) -> None:
    port = peer.rpartition(":")[2]
    by_cidr = new_client(egress="public", egress_allow=["127.0.0.0/8"])
    assert by_cidr.call(f"{peer}/multiply", x=2, y=3) == 6
    by_name = new_client(egress="public", egress_allow=["localhost"])
    assert by_name.call(f"http://localhost:{port}/multiply", x=2, y=4) == 8
    with pytest.raises(EgressDenied):
        by_name.call(f"{peer}/multiply", x=1, y=1)  # 127.0.0.1 by address is not "localhost"


def test_every_hop_passes_the_egress_policy(new_client: MakeClient, peer: str) -> None:
    port = peer.rpartition(":")[2]
    c = new_client(follow_redirects=3, egress="public", egress_allow=["127.0.0.1/32"])
    assert c.call(f"{peer}/redirect", to="/multiply?x=2&y=2") == 4
    with pytest.raises(EgressDenied, match=r"127\.0\.0\.2"):
        c.call(f"{peer}/redirect", to=f"http://127.0.0.2:{port}/multiply?x=1&y=1")


# -- TLS (a trustme CA; the HTTPS server of support.tls) ---------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pems(ca: trustme.CA, tmp_path: Path) -> Pems:
    return write_pems(ca, tmp_path)


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[Server]:
    with https_server(server_context(ca)) as running:
        yield running


def test_tls_verified_against_ca_certs(
    new_client: MakeClient, tls_server: Server, pems: Pems
) -> None:
    c = new_client(ca_certs=pems.ca)
    got = c.call(f"{tls_server.url}/add", x=1, y=2)
    assert got == {"method": "GET", "path": "/add", "args": {"x": "1", "y": "2"}}
    posted = c.call(f"{tls_server.url}/add", "POST", x=3)
    assert posted == {"method": "POST", "path": "/add", "args": {"x": "3"}}
    for i in range(8):  # kept alive: one connection, one handshake
        assert c.call(f"{tls_server.url}/n", i=i)["args"] == {"i": str(i)}
    assert tls_server.stat("requests") == 10
    assert tls_server.stat("connections") == 1
    assert tls_server.stat("handshakes") == 1


def test_a_tls_connection_cut_by_the_deadline_is_closed(
    new_client: MakeClient, tls_server: Server, pems: Pems
) -> None:
    c = new_client(ca_certs=pems.ca, deadline=0.5, retry_attempts=1)
    assert c.call(f"{tls_server.url}/add", x=1)["args"] == {"x": "1"}  # kept alive
    with pytest.raises(DispatchTimeout, match="deadline"):
        c.call(f"{tls_server.url}/sleep")  # the cut lands on a read in the pooled connection
    c.close()
    # A TLS connection left open (its close handshake unanswered) would warn when
    # collected, and the suite's warnings are errors.
    gc.collect()


def test_tls_unknown_ca_fails_and_is_not_retried(
    new_client: MakeClient, tls_server: Server
) -> None:
    c = new_client()
    with pytest.raises(TransportError, match="TLS") as info:
        c.call(f"{tls_server.url}/add", x=1)
    assert not isinstance(info.value, (ConnectError, DispatchTimeout))
    assert info.value.transient is False
    assert isinstance(info.value.__cause__, Exception)
    # A certificate that does not verify will not on a second try: one connection only.
    assert tls_server.stat("connections") == 1
    assert tls_server.stat("requests") == 0


def test_tls_hostname_mismatch_is_refused(
    new_client: MakeClient, ca: trustme.CA, pems: Pems
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("elsewhere.example.org").configure_cert(context)
    with https_server(context) as other:
        c = new_client(ca_certs=pems.ca)
        with pytest.raises(TransportError, match="TLS") as info:
            c.call(f"{other.url}/add")
        assert info.value.transient is False
        assert other.stat("requests") == 0
        c.close()


def test_tls_verify_false_accepts_any_certificate(
    new_client: MakeClient, tls_server: Server
) -> None:
    c = new_client(verify=False)
    if c.name == "sync":  # urllib3 warns on every unverified request; aiohttp does not
        with pytest.warns(InsecureRequestWarning):
            assert c.call(f"{tls_server.url}/add", x=5)["args"] == {"x": "5"}
    else:
        assert c.call(f"{tls_server.url}/add", x=5)["args"] == {"x": "5"}


def test_tls_client_certificate(new_client: MakeClient, ca: trustme.CA, pems: Pems) -> None:
    """Required by the server: refused without one; with one, in one PEM or in two files."""
    with https_server(server_context(ca, require_client_cert=True)) as mtls:
        without = new_client(ca_certs=pems.ca, retry_attempts=1)
        with pytest.raises(TransportError) as info:
            without.call(f"{mtls.url}/add", x=1)
        assert not isinstance(info.value, DispatchTimeout)
        assert mtls.stat("requests") == 0
        refused = mtls.stat("connections")
        one_pem = new_client(ca_certs=pems.ca, client_cert=pems.client)
        for i in range(3):
            assert one_pem.call(f"{mtls.url}/add", x=i)["args"] == {"x": str(i)}
        assert mtls.stat("connections") == refused + 1  # the three calls shared one
        two_files = new_client(
            ca_certs=pems.ca, client_cert=pems.client_cert, client_key=pems.client_key
        )
        assert two_files.call(f"{mtls.url}/add", x=1)["args"] == {"x": "1"}
        without.close()
        one_pem.close()
        two_files.close()


def test_tls_client_key_without_client_cert_is_a_usage_error(
    new_client: MakeClient, pems: Pems
) -> None:
    with pytest.raises(UsageError, match="client_key"):
        new_client(client_key=pems.client_key)
