"""Tests of the Node.js task-server peer itself (tests/peers/taskserver.mjs).

Only ``http.client`` talks to the peer here, so these tests check the peer, not
dispatchkit. Every connection has a timeout and is closed (filterwarnings=error).
"""

from __future__ import annotations

import http.client
import json
import select
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

try:
    from support.node_peer import NODE, PEER_SCRIPT, node_peer
except ImportError:  # tests/ collected as a package
    from tests.support.node_peer import NODE, PEER_SCRIPT, node_peer  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

TIMEOUT = 10.0
Headers = dict[str, str]


class Answer:
    def __init__(self, resp: http.client.HTTPResponse, body: bytes) -> None:
        self.status = resp.status
        self.headers = resp.headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture(scope="module")
def peer() -> Iterator[str]:
    with node_peer() as url:
        yield url


def hostport(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def connect(url: str, timeout: float = TIMEOUT) -> http.client.HTTPConnection:
    host, port = hostport(url)
    return http.client.HTTPConnection(host, port, timeout=timeout)


def exchange(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: Headers | None = None,
) -> Answer:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return Answer(resp, resp.read())


def call(
    url: str,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: Headers | None = None,
) -> Answer:
    conn = connect(url)
    try:
        return exchange(conn, method, path, body, headers)
    finally:
        conn.close()


def form(method: str, url: str, path: str, fields: dict[str, Any]) -> Answer:
    body = urllib.parse.urlencode(fields, doseq=True)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return call(url, method, path, body, headers)


def as_json(url: str, method: str, path: str, value: Any) -> Answer:
    headers = {"Content-Type": "application/json"}
    return call(url, method, path, json.dumps(value), headers)


def key() -> Headers:
    return {"Idempotency-Key": uuid.uuid4().hex}


def success(answer: Answer, status: int = 200) -> Any:
    assert answer.status == status
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Content-Length"] == str(len(answer.body))
    envelope = answer.json()
    assert envelope["status"] == "success", envelope
    return envelope["retval"]


def failure(answer: Answer, status: int) -> str:
    assert answer.status == status
    assert answer.headers["Content-Type"] == "application/json"
    envelope = answer.json()
    assert envelope["status"] == "failure", envelope
    assert isinstance(envelope["reason"], str)
    return envelope["reason"]


# ---------------------------------------------------------------- /multiply


def test_multiply_query(peer: str) -> None:
    assert success(call(peer, "GET", "/multiply?x=6&y=7")) == 42
    assert success(call(peer, "GET", "/multiply?x=1.5&y=-2")) == -3


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_multiply_form_body(peer: str, method: str) -> None:
    assert success(form(method, peer, "/multiply", {"x": 3, "y": 4})) == 12


def test_multiply_json_body(peer: str) -> None:
    assert success(as_json(peer, "POST", "/multiply", {"x": 2, "y": 2.5})) == 5


def test_body_wins_over_query(peer: str) -> None:
    assert success(form("POST", peer, "/multiply?x=100&y=2", {"x": 5})) == 10


def test_get_body_is_not_an_argument(peer: str) -> None:
    answer = call(peer, "GET", "/multiply?x=2&y=2", "x=100", {"Content-Type": "x"})
    assert success(answer) == 4


@pytest.mark.parametrize(
    ("query", "name"), [("x=1", "y"), ("y=1", "x"), ("x=a&y=1", "x"), ("x=1&y=", "y")]
)
def test_multiply_bad_argument(peer: str, query: str, name: str) -> None:
    reason = failure(call(peer, "GET", f"/multiply?{query}"), 400)
    assert name in reason


def test_invalid_json_body(peer: str) -> None:
    headers = {"Content-Type": "application/json"}
    assert "JSON" in failure(call(peer, "POST", "/multiply", "{x", headers), 400)
    assert failure(as_json(peer, "POST", "/multiply", [1, 2]), 400)


def test_body_cap(peer: str) -> None:
    too_big = b"a" * (1024 * 1024 + 1)
    assert "1048576" in failure(call(peer, "POST", "/echo", too_big), 413)
    just_under = b"a" * (1024 * 1024)
    assert success(call(peer, "POST", "/echo", just_under))["body"] == just_under.decode()


# ---------------------------------------------------------------- /echo


def test_echo_get(peer: str) -> None:
    retval = success(call(peer, "GET", "/echo?a=1&a=2&b=%C3%A9+x&c", headers={"X-Test": "yes"}))
    assert retval["method"] == "GET"
    assert retval["path"] == "/echo"
    assert retval["query"] == [["a", "1"], ["a", "2"], ["b", "é x"], ["c", ""]]
    assert retval["body"] == ""
    assert retval["content_type"] is None
    assert retval["headers"]["x-test"] == "yes"
    assert retval["args"] == {"a": ["1", "2"], "b": "é x", "c": ""}


def test_echo_form_post(peer: str) -> None:
    answer = form("POST", peer, "/echo?a=0&q=1", {"a": ["1", "2"], "ü": "ß"})
    retval = success(answer)
    assert retval["method"] == "POST"
    assert retval["query"] == [["a", "0"], ["q", "1"]]
    assert retval["body"] == "a=1&a=2&%C3%BC=%C3%9F"
    assert retval["content_type"] == "application/x-www-form-urlencoded"
    assert retval["args"] == {"a": ["1", "2"], "q": "1", "ü": "ß"}


def test_echo_json_post(peer: str) -> None:
    retval = success(as_json(peer, "PUT", "/echo?a=0", {"a": [1, 2], "n": None}))
    assert retval["method"] == "PUT"
    assert retval["args"] == {"a": [1, 2], "n": None}
    assert json.loads(retval["body"]) == {"a": [1, 2], "n": None}


def test_echo_head(peer: str) -> None:
    answer = call(peer, "HEAD", "/echo")
    assert answer.status == 200
    assert answer.body == b""
    assert int(answer.headers["Content-Length"]) > 0


# ---------------------------------------------------------------- failures, status


def test_fail(peer: str) -> None:
    assert failure(call(peer, "GET", "/fail"), 200) == "boom"
    assert failure(call(peer, "GET", "/fail?reason=bad+input"), 200) == "bad input"
    assert failure(form("POST", peer, "/fail", {"reason": "posted"}), 200) == "posted"


def test_fail500(peer: str) -> None:
    assert failure(call(peer, "GET", "/fail500"), 500) == "boom"
    assert failure(call(peer, "POST", "/fail500?reason=down"), 500) == "down"


@pytest.mark.parametrize("code", [200, 400, 404, 418, 429, 500, 502, 503, 504])
def test_status(peer: str, code: int) -> None:
    answer = call(peer, "GET", f"/status/{code}")
    assert answer.status == code
    assert answer.body == f"nope {code}".encode()
    assert answer.headers["Content-Type"] == "text/plain"
    assert "Retry-After" not in answer.headers


def test_status_headers(peer: str) -> None:
    answer = call(peer, "GET", "/status/503?retry_after=7&location=/elsewhere")
    assert answer.status == 503
    assert answer.headers["Retry-After"] == "7"
    assert answer.headers["Location"] == "/elsewhere"


def test_status_204_has_no_body(peer: str) -> None:
    answer = call(peer, "GET", "/status/204")
    assert answer.status == 204
    assert answer.body == b""


def test_unknown_task(peer: str) -> None:
    assert failure(call(peer, "GET", "/no/such/task"), 404) == "unknown task: /no/such/task"
    assert failure(call(peer, "GET", "/status/99"), 404) == "unknown task: /status/99"


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("empty", b""),
        ("json", b"{not json"),
        ("array", b"[1,2]"),
        ("nostatus", b'{"retval":1}'),
        ("unknown", b'{"status":"pending"}'),
        ("long", b"x" * 1000),
    ],
)
def test_invalid(peer: str, name: str, body: bytes) -> None:
    answer = call(peer, "GET", f"/invalid/{name}")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Content-Length"] == str(len(body))
    assert answer.body == body


@pytest.mark.parametrize("media_type", ["text/html; charset=utf-8", "application/x-custom"])
def test_content_type(peer: str, media_type: str) -> None:
    path = "/content-type?" + urllib.parse.urlencode({"type": media_type})
    answer = call(peer, "GET", path)
    assert answer.status == 200
    assert answer.headers["Content-Type"] == media_type
    assert answer.json() == {"status": "success", "retval": "typed"}


def test_content_type_missing(peer: str) -> None:
    answer = call(peer, "GET", "/content-type?type=")
    assert answer.status == 200
    assert "Content-Type" not in answer.headers
    assert answer.json() == {"status": "success", "retval": "typed"}


# ---------------------------------------------------------------- /flaky, /record, /seen


def test_flaky_counts_per_key(peer: str) -> None:
    first, second = key(), key()
    for _ in range(2):
        answer = call(peer, "POST", "/flaky?fail=2&retry_after=3", headers=first)
        assert answer.status == 503
        assert answer.body == b"try again"
        assert answer.headers["Content-Type"] == "text/plain"
        assert answer.headers["Retry-After"] == "3"
    # another key has its own count
    assert call(peer, "POST", "/flaky?fail=2", headers=second).status == 503
    assert success(call(peer, "POST", "/flaky?fail=2", headers=first)) == 3
    assert success(call(peer, "POST", "/flaky?fail=2", headers=first)) == 4


def test_flaky_defaults_and_code(peer: str) -> None:
    headers = key()
    answer = call(peer, "GET", "/flaky", headers=headers)
    assert answer.status == 503
    assert "Retry-After" not in answer.headers
    assert success(call(peer, "GET", "/flaky", headers=headers)) == 2
    headers = key()
    assert call(peer, "GET", "/flaky?code=429", headers=headers).status == 429
    assert success(call(peer, "GET", "/flaky?fail=0", headers=key())) == 1


def test_record_and_seen(peer: str) -> None:
    success(call(peer, "GET", "/seen/reset"))
    assert success(call(peer, "GET", "/seen")) == {}
    first, second = key(), key()
    assert success(call(peer, "POST", "/record", headers=first)) == first["Idempotency-Key"]
    assert success(call(peer, "POST", "/record", headers=first)) == first["Idempotency-Key"]
    call(peer, "GET", "/flaky?fail=0", headers=first)
    call(peer, "GET", "/flaky", headers=second)
    seen = success(call(peer, "GET", "/seen"))
    assert seen == {first["Idempotency-Key"]: 3, second["Idempotency-Key"]: 1}
    assert success(call(peer, "GET", "/seen/reset")) == {}
    assert success(call(peer, "GET", "/seen")) == {}


# ---------------------------------------------------------------- /slow, /redirect


def test_slow(peer: str) -> None:
    started = time.monotonic()
    assert success(call(peer, "GET", "/slow?delay=200")) == 200
    assert time.monotonic() - started >= 0.15


def test_slow_client_gives_up(peer: str) -> None:
    conn = connect(peer, timeout=0.2)
    try:
        with pytest.raises(TimeoutError):
            exchange(conn, "GET", "/slow?delay=20000")
    finally:
        conn.close()
    assert success(call(peer, "GET", "/multiply?x=2&y=3")) == 6


def test_redirect(peer: str) -> None:
    answer = call(peer, "GET", "/redirect")
    assert answer.status == 302
    assert answer.headers["Location"] == "/multiply"
    assert answer.body == b""
    answer = call(peer, "POST", "/redirect?to=http://example.invalid/x")
    assert answer.status == 302
    assert answer.headers["Location"] == "http://example.invalid/x"


# ---------------------------------------------------------------- /big, /drop


@pytest.mark.parametrize("size", [0, 1, 65536, 200_001, 3 * 1024 * 1024])
def test_big_chunked(peer: str, size: int) -> None:
    answer = call(peer, "GET", f"/big?bytes={size}")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in answer.headers
    assert len(answer.body) == size
    assert answer.body == b"x" * size


@pytest.mark.parametrize("size", [0, 200_001, 3 * 1024 * 1024])
def test_big_with_length(peer: str, size: int) -> None:
    answer = call(peer, "GET", f"/big?bytes={size}&length=1")
    assert answer.status == 200
    assert answer.headers["Content-Length"] == str(size)
    assert "Transfer-Encoding" not in answer.headers
    assert answer.body == b"x" * size


def test_big_client_disconnects(peer: str) -> None:
    conn = connect(peer)
    try:
        conn.request("GET", "/big?bytes=200000000")
        resp = conn.getresponse()
        assert resp.read(100_000) == b"x" * 100_000
    finally:
        conn.close()
    assert success(call(peer, "GET", "/multiply?x=3&y=3")) == 9


def test_drop(peer: str) -> None:
    with pytest.raises(ConnectionError):
        call(peer, "GET", "/drop")
    assert success(call(peer, "GET", "/multiply?x=1&y=1")) == 1


# ---------------------------------------------------------------- keep-alive, /stats


def test_stats_keep_alive(peer: str) -> None:
    assert success(call(peer, "GET", "/stats/reset")) == {"connections": 0, "requests": 0}
    conn = connect(peer)
    try:
        for i in range(5):
            answer = exchange(conn, "GET", f"/multiply?x={i}&y=2")
            assert success(answer) == i * 2
            assert answer.headers["Connection"] == "keep-alive"
            assert answer.headers["Keep-Alive"] == "timeout=30"
        assert success(exchange(conn, "GET", "/stats")) == {"connections": 1, "requests": 6}
    finally:
        conn.close()


# ---------------------------------------------------------------- process lifetime


def start_directly(*args: str) -> subprocess.Popen[bytes]:
    assert NODE is not None
    return subprocess.Popen(
        [NODE, str(PEER_SCRIPT), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def first_line(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    assert readable, "the peer printed nothing in time"
    return proc.stdout.readline()  # node writes the whole line at once


def finish(proc: subprocess.Popen[bytes]) -> int | None:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
        return None
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_exits_when_stdin_closes() -> None:
    proc = start_directly()
    try:
        assert first_line(proc).startswith(b"LISTENING http://127.0.0.1:")
        assert proc.stdin is not None
        proc.stdin.close()
    finally:
        code = finish(proc)
    assert code == 0


def test_exits_on_sigterm() -> None:
    proc = start_directly()
    try:
        assert first_line(proc).startswith(b"LISTENING ")
        proc.terminate()
    finally:
        code = finish(proc)
    assert code == 0


def test_node_peer_cleans_up() -> None:
    with node_peer() as url:
        assert url.startswith("http://127.0.0.1:")
        assert success(call(url, "GET", "/multiply?x=2&y=21")) == 42
    with pytest.raises(ConnectionError):
        call(url, "GET", "/multiply?x=2&y=21")
