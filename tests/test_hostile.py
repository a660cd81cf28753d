"""What a hostile (or merely odd) server can do to the client, and what the client does.

Interim answers, a pool that runs dry, headers that cannot be sent, compression
bombs, numbers JSON cannot carry, and urllib3's HTTP/2 switch. Every server is a
real socket on 127.0.0.1 (``support.scripted_server``); each case and its outcome
is listed in docs/reliability.md.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dispatchkit import (
    DispatchTimeout,
    EncodeError,
    InvalidResponseError,
    Request,
    ResponseTooLargeError,
    TransportError,
    UsageError,
    hookimpl,
)
from support.scripted_server import (
    RawRequest,
    ScriptedServer,
    envelope,
    read,
    response,
    send,
    serve,
    sleep,
)

# -- interim (1xx) answers ------------------------------------------------------------

EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"


def own_key(interim: bytes) -> Callable[[RawRequest], bytes]:
    """Answer every request with its own Idempotency-Key, after ``interim`` heads."""

    def answer(request: RawRequest) -> bytes:
        return interim + response(200, envelope(request.headers["idempotency-key"]))

    return answer


@pytest.mark.parametrize(
    "interim",
    [EARLY_HINTS, PROCESSING, PROCESSING + EARLY_HINTS + EARLY_HINTS],
    ids=["103", "102", "102-103-103"],
)
def test_interim_answers_are_skipped_and_never_answer_the_next_call(
    make_dispatcher: Any, interim: bytes
) -> None:
    """RFC 9110 §15.2: a client parses and discards 1xx answers it did not ask for.

    Both calls share one keep-alive connection; each gets its own answer.
    """
    with ScriptedServer([serve(own_key(interim))]) as server:
        d = make_dispatcher(retry_attempts=1)
        for n in range(3):
            assert d.apply(f"{server.url}/t", "GET", task_id=f"call-{n}") == f"call-{n}"
        assert server.connections_accepted == 1


def test_endless_interim_answers_are_refused(make_dispatcher: Any) -> None:
    """A server that never stops sending 1xx heads gets a TransportError, not a spin."""
    with ScriptedServer([read(), send(EARLY_HINTS * 200), sleep(1)]) as server:
        d = make_dispatcher(retry_attempts=1)
        with pytest.raises(TransportError, match="interim"):
            d.call(f"{server.url}/t")


def test_an_unasked_switch_of_protocols_is_an_error(make_dispatcher: Any) -> None:
    """101 without an Upgrade request: the connection speaks something else now."""
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    with ScriptedServer([serve(lambda r: switch + response(200, envelope("no")))]) as server:
        d = make_dispatcher(retry_attempts=1)
        with pytest.raises(TransportError, match="101") as info:
            d.call(f"{server.url}/t", "POST")
        assert not info.value.transient


# -- a pool that runs dry -------------------------------------------------------------


def test_a_pool_timeout_does_not_break_the_call_holding_the_connection(
    make_dispatcher: Any,
) -> None:
    """The call that waited in vain for a connection must not put back one it never took.

    Before, it added a phantom slot: the holder's call then failed with
    FullPoolError, and the pool opened more than ``pool_maxsize`` connections.
    """
    release = threading.Event()

    def slow_then_quick(request: RawRequest) -> bytes:
        if request.target.startswith("/slow"):
            release.wait(5)
        return response(200, envelope(request.target))

    with ScriptedServer([serve(slow_then_quick)]) as server:
        d = make_dispatcher(pool_maxsize=1, retry_attempts=1)
        results: list[Any] = []
        holder = threading.Thread(target=lambda: results.append(d.call(f"{server.url}/slow")))
        holder.start()
        assert server.wait_until(lambda s: len(s.requests) == 1, timeout=5)
        with pytest.raises(DispatchTimeout, match="no pooled connection"):
            d.apply(f"{server.url}/waiter", timeout=0.2)
        release.set()
        holder.join(10)
        assert results == ["/slow"]
        threads = [
            threading.Thread(target=lambda n=n: results.append(d.call(f"{server.url}/q{n}")))
            for n in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(results[1:]) == sorted(f"/q{n}" for n in range(8))
        assert server.connections_accepted == 1  # pool_maxsize=1, blocking


# -- headers that cannot be sent ----------------------------------------------------------

BAD_HEADERS = {
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
    make_dispatcher: Any, case: str
) -> None:
    headers, named = BAD_HEADERS[case]
    with ScriptedServer([serve()]) as server:
        d = make_dispatcher()
        with pytest.raises(UsageError, match="header") as info:
            d.apply(f"{server.url}/t", "GET", headers=headers)
        assert named in str(info.value)
        with pytest.raises(UsageError, match="header"):
            d.apply_async(f"{server.url}/t", "PUT", headers=headers)
        assert server.connections_accepted == 0


@pytest.mark.parametrize("task_id", ["id\r\nX-Injected: 1", "€uro", "id\x00"])
def test_a_task_id_that_cannot_be_a_header_is_a_usage_error(
    make_dispatcher: Any, task_id: str
) -> None:
    with ScriptedServer([serve()]) as server:
        d = make_dispatcher()
        with pytest.raises(UsageError, match="Idempotency-Key"):
            d.apply(f"{server.url}/t", "GET", task_id=task_id)
        assert server.connections_accepted == 0


def test_a_plugin_adding_an_unsendable_header_is_not_retried(make_dispatcher: Any) -> None:
    class Broken:
        @hookimpl
        def dispatchkit_prepare_request(self, request: Request) -> None:
            request.headers["X-Signature"] = "€"

    with ScriptedServer([serve()]) as server:
        d = make_dispatcher(plugins=[Broken()])
        with pytest.raises(UsageError, match="X-Signature"):
            d.call(f"{server.url}/t", "GET")
        assert server.requests == []


# -- compression bombs ----------------------------------------------------------------------

MIB = 1024 * 1024
INFLATED = 64 * MIB  # what each bomb inflates to; max_response_bytes is 1 MiB


def _compress(compressor: Any, size: int, finish: Callable[[], bytes]) -> bytes:
    block = bytes(MIB)
    return b"".join(compressor(block) for _ in range(size // MIB)) + finish()


def _gzip(data_size: int | None = None, data: bytes | None = None) -> bytes:
    if data is not None:
        return gzip.compress(data)
    assert data_size is not None
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    return _compress(z.compress, data_size, z.flush)


def _deflate(data: bytes) -> bytes:
    return zlib.compress(data, 9)


def _brotli(data_size: int) -> bytes:
    brotli = pytest.importorskip("brotli")
    c = brotli.Compressor(quality=5)
    return _compress(c.process, data_size, c.finish)


def _zstd(data_size: int) -> bytes:
    zstd: Any = pytest.importorskip("backports.zstd") if sys.version_info < (3, 14) else None
    if zstd is None:  # pragma: no cover - Python 3.14+
        from compression import zstd  # type: ignore[import-not-found,no-redef]
    c = zstd.ZstdCompressor()
    return _compress(c.compress, data_size, c.flush)


def bombs() -> Iterator[tuple[str, str, Callable[[], bytes]]]:
    yield "gzip", "gzip", lambda: _gzip(INFLATED)
    yield "gzip-gzip", "gzip, gzip", lambda: _gzip(data=_gzip(INFLATED))
    yield "deflate-gzip", "gzip, deflate", lambda: _deflate(_gzip(INFLATED))
    yield "br", "br", lambda: _brotli(INFLATED)
    yield "zstd", "zstd", lambda: _zstd(INFLATED)


BOMBS = {name: (encoding, make) for name, encoding, make in bombs()}


@pytest.mark.parametrize("name", list(BOMBS))
def test_max_response_bytes_bounds_the_decoded_body(make_dispatcher: Any, name: str) -> None:
    """A few KiB that inflate to 64 MiB stop at the limit, without the 64 MiB in memory."""
    encoding, make = BOMBS[name]
    bomb = make()
    assert len(bomb) < MIB
    answer = response(200, bomb, {"Content-Encoding": encoding})
    with ScriptedServer([read(), send(answer), sleep(2)]) as server:
        d = make_dispatcher(max_response_bytes=MIB, retry_attempts=1)
        tracemalloc.start()
        try:
            with pytest.raises(ResponseTooLargeError):
                d.call(f"{server.url}/t")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 * MIB


def test_a_compressed_answer_within_the_limit_is_decoded(make_dispatcher: Any) -> None:
    body = envelope("x" * 100_000)
    answer = response(200, _deflate(_gzip(data=body)), {"Content-Encoding": "gzip, deflate"})
    with ScriptedServer([read(), send(answer), sleep(1)]) as server:
        d = make_dispatcher(max_response_bytes=len(body), retry_attempts=1)
        assert d.call(f"{server.url}/t") == "x" * 100_000


def test_a_body_that_does_not_decode_is_an_invalid_response(make_dispatcher: Any) -> None:
    answer = response(200, b"not gzip at all", {"Content-Encoding": "gzip"})
    with ScriptedServer([read(), send(answer), sleep(1)]) as server:
        d = make_dispatcher(retry_attempts=3)
        with pytest.raises(InvalidResponseError, match="decode"):
            d.call(f"{server.url}/t")
        assert len(server.requests) == 1  # the server's bytes are wrong: not retried


# -- numbers JSON cannot carry ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"x": float("nan")}, "x"),
        ({"ok": 1.5, "y": float("inf")}, "y"),
        ({"points": [1.0, float("-inf")]}, "points"),
        ({"nested": {"deep": [{"v": float("nan")}]}}, "nested"),
    ],
)
def test_json_refuses_nan_and_infinity(
    make_dispatcher: Any, kwargs: dict[str, Any], named: str
) -> None:
    """orjson would send them as null, silently changing the argument."""
    with ScriptedServer([serve()]) as server:
        d = make_dispatcher()
        with pytest.raises(EncodeError, match="JSON") as info:
            d.apply(f"{server.url}/t", "POST", kwargs, json=True)
        assert info.value.argument == named
        assert server.connections_accepted == 0


def test_json_still_sends_a_real_null(make_dispatcher: Any) -> None:
    with ScriptedServer([serve()]) as server:
        d = make_dispatcher()
        sent = d.apply(f"{server.url}/t", "POST", {"x": None, "y": [None, 1.5]}, json=True)
        assert sent == '{"x":null,"y":[null,1.5]}'


# -- urllib3's HTTP/2 switch ---------------------------------------------------------------


def test_urllib3_http2_injection_is_refused_with_a_clear_error(make_dispatcher: Any) -> None:
    """Our HTTPS connections speak HTTP/1.1; with h2 offered in ALPN they would be lied to."""
    http2 = pytest.importorskip("urllib3.http2")
    pytest.importorskip("h2")
    d = make_dispatcher(retry_attempts=1)
    http2.inject_into_urllib3()
    try:
        with pytest.raises(UsageError, match="inject_into_urllib3"):
            d.call("https://127.0.0.1:9/t")
    finally:
        http2.extract_from_urllib3()
    with pytest.raises(TransportError):  # back to HTTP/1.1: an ordinary connect error
        d.call("https://127.0.0.1:9/t")


def test_urllib3_http2_injected_before_import_is_refused_too() -> None:
    pytest.importorskip("h2")
    code = (
        "import urllib3.http2; urllib3.http2.inject_into_urllib3()\n"
        "from dispatchkit import Dispatcher, UsageError\n"
        "try:\n"
        "    Dispatcher(retry_attempts=1).call('https://127.0.0.1:9/t')\n"
        "except UsageError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert "refused:" in done.stdout, done.stderr
    assert "inject_into_urllib3" in done.stdout
