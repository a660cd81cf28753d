"""Standard Webhooks signing: the plugin signs, TaskApp verifies, both agree with the reference.

Every request crosses a real socket on 127.0.0.1: a recording WSGI app on a
TaskServer captures what the plugin sends, and raw http.client requests
carry what the reference ``standardwebhooks`` package signs to a real
TaskApp. Tasks count their runs, so "refused" always means "did not run".
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from dispatchkit import (
    Dispatcher,
    Outcome,
    RemoteExecuteError,
    Request,
    UsageError,
    hookimpl,
)
from dispatchkit.builtin import signing as signing_plugin
from dispatchkit.server import TaskApp, TaskServer
from dispatchkit.server._refused import Refused
from dispatchkit.server._signing import ReplayCache
from dispatchkit.signing import (
    SignatureError,
    SigningKeys,
    check,
    generate_secret,
    query_payload,
    request_payload,
    verify,
)

SECRET = generate_secret()
OLD = generate_secret()
OTHER = generate_secret()
TIMEOUT = 10.0
FORM = "application/x-www-form-urlencoded"

# -- servers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request as the recorder received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> bytes:
        """What Standard Webhooks signs here: the body, or the raw query for GET."""
        return self.query.encode("latin-1") if self.method in ("GET", "HEAD") else self.body


class Recorder:
    """A WSGI app that records every request; the first ``fail_first`` get a bare 503."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.seen: list[Seen] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        headers = {
            key[5:].replace("_", "-").lower(): str(value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        seen = Seen(
            environ["REQUEST_METHOD"],
            environ.get("PATH_INFO", ""),
            environ.get("QUERY_STRING", ""),
            headers,
            body,
        )
        with self._lock:
            self.seen.append(seen)
            count = len(self.seen)
        if count <= self.fail_first:
            start_response(
                "503 Service Unavailable",
                [("Retry-After", "1"), ("Content-Type", "text/plain"), ("Content-Length", "9")],
            )
            return [b"try again"]
        data = json.dumps({"status": "success", "retval": count}).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        )
        return [data]


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    app = Recorder()
    with TaskServer(app) as server:
        yield app, server.url


@pytest.fixture
def signer(make_dispatcher: Any) -> Dispatcher:
    d: Dispatcher = make_dispatcher(signing_secret=SECRET)
    return d


def counting_app(**options: Any) -> tuple[TaskApp, Counter[str]]:
    runs: Counter[str] = Counter()
    lock = threading.Lock()
    app = TaskApp(**options)

    @app.task
    def add(x: int, y: int) -> int:
        with lock:
            runs["add"] += 1
        return x + y

    @app.task
    def sub(x: int, y: int) -> int:
        with lock:
            runs["sub"] += 1
        return x - y

    return app, runs


@pytest.fixture
def served() -> Iterator[Any]:
    """Serve TaskApps made with ``served(**options)``; all are stopped and closed."""
    stack: list[tuple[TaskApp, TaskServer]] = []

    def serve(**options: Any) -> tuple[TaskServer, Counter[str]]:
        app, runs = counting_app(**options)
        server = app.server().start()
        stack.append((app, server))
        return server, runs

    yield serve
    for app, server in stack:
        server.stop()
        app.close()


def send(
    server: TaskServer,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, Any, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    return response.status, json.loads(raw) if raw else None, response


def reference_headers(
    secret: str, msg_id: str, payload: bytes, when: datetime | None = None
) -> dict[str, str]:
    """The three headers as the reference package signs them."""
    when = when or datetime.now(tz=timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, payload.decode()),
    }


def new_id() -> str:
    return f"msg_{time.monotonic_ns()}"


# -- the plugin -----------------------------------------------------------------------


def test_without_a_secret_the_plugin_is_not_even_loaded(
    dispatcher: Dispatcher, recorder: tuple[Recorder, str]
) -> None:
    """Off until signing_secret is given: an unsigned Dispatcher pays for no hook."""
    app, url = recorder
    assert "signing" not in [p.name for p in dispatcher.plugins]
    per_attempt = dispatcher._pipeline.pm.hook.dispatchkit_prepare_request.get_hookimpls()
    assert "signing" not in [impl.plugin_name for impl in per_attempt]
    dispatcher.call(f"{url}/task", x=1)
    dispatcher.call(f"{url}/task", "POST", x=1)
    assert [s.headers.keys() & {"webhook-id", "webhook-signature"} for s in app.seen] == [
        set(),
        set(),
    ]


def test_with_a_secret_the_builtin_plugin_signs(recorder: tuple[Recorder, str]) -> None:
    app, url = recorder
    with Dispatcher(signing_secret=SECRET) as d:
        (info,) = [p for p in d.plugins if p.name == "signing"]
        assert (info.builtin, info.distribution) == (True, "dispatchkit")
        assert info.hooks == ("dispatchkit_configure", "dispatchkit_prepare_request")
        assert isinstance(info.plugin, signing_plugin.Plugin)
        assert "whsec_***" in repr(info.plugin)
        d.call(f"{url}/task", x=1)
    (seen,) = app.seen
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= seen.headers.keys()


def test_the_builtin_signing_plugin_can_be_disabled() -> None:
    with pytest.raises(UsageError, match="signing_secret"):  # then nothing reads the setting
        Dispatcher(signing_secret=SECRET, disable=["signing"])


@pytest.mark.parametrize(
    ("method", "kwargs", "json_body"),
    [
        ("GET", {"x": "1", "name": "café & co", "tags": ["a b", "c/d"]}, False),
        ("GET", {}, False),
        ("DELETE", {"x": "1"}, False),
        ("POST", {"x": "1", "name": "café & co", "tags": ["a", "b"]}, False),
        ("POST", {"x": 1, "nested": "ü"}, True),
        ("PUT", {}, False),
    ],
)
def test_reference_verifies_what_the_plugin_signs(
    signer: Dispatcher,
    recorder: tuple[Recorder, str],
    method: str,
    kwargs: dict[str, Any],
    json_body: bool,
) -> None:
    app, url = recorder
    signer.apply(f"{url}/task", method, kwargs, task_id="task_42", json=json_body)
    (seen,) = app.seen
    headers = seen.headers
    assert headers["webhook-id"] == headers["idempotency-key"] == "task_42"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert headers["webhook-signature"].startswith("v1,")
    payload = seen.query.encode() if method in ("GET", "DELETE") else seen.body
    assert (payload == b"") == (not kwargs)
    Webhook(SECRET).verify(payload, headers, json_parse=False)
    verify(headers, payload, SECRET)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER).verify(payload, headers, json_parse=False)


def test_get_signs_the_query_as_sent(signer: Dispatcher, recorder: tuple[Recorder, str]) -> None:
    # A URL written by hand: urllib3 encodes the space, the é and upper-cases %2f.
    app, url = recorder
    signer.call(f"{url}/task?b=%2f&a=x y&c=é#fragment")
    (seen,) = app.seen
    assert seen.query == "b=%2F&a=x%20y&c=%C3%A9"
    Webhook(SECRET).verify(seen.query, seen.headers, json_parse=False)
    assert query_payload(f"{url}/task?b=%2f&a=x y&c=é#fragment") == seen.query.encode()


def test_every_attempt_is_signed_afresh(make_dispatcher: Any) -> None:
    app = Recorder(fail_first=1)  # a bare 503 with Retry-After: 1, then success
    with TaskServer(app) as server:
        d = make_dispatcher(signing_secret=SECRET)
        assert d.apply(f"{server.url}/task", "GET", {"x": 1}, task_id="call_1") == 2
    first, second = app.seen
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "call_1"
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]
    for seen in (first, second):
        Webhook(SECRET).verify(seen.payload, seen.headers, json_parse=False)


def test_key_rotation_signs_with_every_key(
    make_dispatcher: Any, recorder: tuple[Recorder, str]
) -> None:
    app, url = recorder
    d = make_dispatcher(signing_secret=[SECRET, OLD])
    d.call(f"{url}/task", "POST", x=1)
    (seen,) = app.seen
    assert len(seen.headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, OLD):
        Webhook(secret).verify(seen.body, seen.headers, json_parse=False)
        verify(seen.headers, seen.body, secret)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER).verify(seen.body, seen.headers, json_parse=False)


def test_raw_bytes_key_matches_its_whsec_form(
    make_dispatcher: Any, recorder: tuple[Recorder, str]
) -> None:
    app, url = recorder
    raw = base64.b64decode(SECRET.removeprefix("whsec_"))
    make_dispatcher(signing_secret=raw).call(f"{url}/task", x=1)
    (seen,) = app.seen
    Webhook(SECRET).verify(seen.payload, seen.headers, json_parse=False)


def test_a_task_id_with_a_dot_is_refused_before_sending(
    signer: Dispatcher, recorder: tuple[Recorder, str]
) -> None:
    app, url = recorder
    with pytest.raises(SignatureError, match="webhook-id") as caught:
        signer.apply(f"{url}/task", "GET", {"x": 1}, task_id="a.b")
    assert caught.value.task_id == "a.b"
    assert app.seen == []


def test_caller_headers_of_the_same_names_are_replaced(
    signer: Dispatcher, recorder: tuple[Recorder, str]
) -> None:
    app, url = recorder
    forged = {"Webhook-Id": "forged", "WEBHOOK-SIGNATURE": "v1,AAAA"}
    signer.apply(f"{url}/task", "GET", {"x": 1}, headers=forged, task_id="real")
    (seen,) = app.seen
    assert seen.headers["webhook-id"] == "real"
    Webhook(SECRET).verify(seen.payload, seen.headers, json_parse=False)


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("c2VjcmV0LWtleS10aGF0LWlzLWxvbmctZW5vdWdo", "must start with 'whsec_'"),
        ("whsec_not base64!", "not valid base64"),
        ("whsec_c2hvcnQ=", "is 5 bytes"),
        (b"short", "is 5 bytes"),
        ([], "empty list"),
        (42, "got int"),
        ([SECRET, 42], "#2 must be a str or bytes"),
    ],
)
def test_bad_secrets_are_usage_errors(secret: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Dispatcher(signing_secret=secret)
    with pytest.raises(ValueError, match=message):
        TaskApp(signing_secret=secret)


def test_unpadded_base64_is_accepted() -> None:
    assert SigningKeys.parse(SECRET.rstrip("=")) == SigningKeys.parse(SECRET)


def test_signing_secrets_is_not_a_setting() -> None:
    with pytest.raises(UsageError, match="signing_secrets"):
        Dispatcher(signing_secrets=[SECRET])


# -- TaskApp verifies ------------------------------------------------------------------


@pytest.mark.parametrize(("method", "json_body"), [("GET", False), ("POST", False), ("POST", True)])
def test_taskapp_accepts_the_plugin(
    served: Any, signer: Dispatcher, method: str, json_body: bool
) -> None:
    server, runs = served(signing_secret=SECRET)
    assert signer.apply(f"{server.url}/add", method, {"x": 2, "y": 3}, json=json_body) == 5
    assert runs["add"] == 1


def test_taskapp_accepts_the_reference(served: Any) -> None:
    server, runs = served(signing_secret=SECRET)
    body = b"x=2&y=3"
    headers = reference_headers(SECRET, new_id(), body) | {"Content-Type": FORM}
    status, answer, _ = send(server, "POST", "/add", headers, body)
    assert (status, answer) == (200, {"status": "success", "retval": 5})
    query = b"x=4&y=5"
    status, answer, _ = send(
        server, "GET", "/add?x=4&y=5", reference_headers(SECRET, new_id(), query)
    )
    assert (status, answer) == (200, {"status": "success", "retval": 9})
    body = b'{"x": 1, "y": 1}'
    headers = reference_headers(SECRET, new_id(), body) | {"Content-Type": "application/json"}
    assert send(server, "POST", "/add", headers, body)[0] == 200
    status, answer, _ = send(
        server, "HEAD", "/add?x=1&y=1", reference_headers(SECRET, new_id(), b"x=1&y=1")
    )
    assert (status, answer) == (200, None)
    assert runs["add"] == 4


def test_taskapp_rotation_accepts_either_key(served: Any, make_dispatcher: Any) -> None:
    server, runs = served(signing_secret=[SECRET, OLD])
    for secret in (SECRET, OLD):
        assert make_dispatcher(signing_secret=secret).call(f"{server.url}/add", x=1, y=1) == 2
    with pytest.raises(RemoteExecuteError, match="no valid signature") as caught:
        make_dispatcher(signing_secret=OTHER).call(f"{server.url}/add", x=1, y=1)
    assert caught.value.status == 401
    assert runs["add"] == 2


def _stale(secret: str, msg_id: str, payload: bytes) -> dict[str, str]:
    return reference_headers(
        secret, msg_id, payload, datetime.now(tz=timezone.utc) - timedelta(seconds=400)
    )


def _future(secret: str, msg_id: str, payload: bytes) -> dict[str, str]:
    return reference_headers(
        secret, msg_id, payload, datetime.now(tz=timezone.utc) + timedelta(seconds=400)
    )


def _replace(**changes: str) -> Any:
    def make(secret: str, msg_id: str, payload: bytes) -> dict[str, str]:
        return reference_headers(secret, msg_id, payload) | changes

    return make


def _drop(name: str) -> Any:
    def make(secret: str, msg_id: str, payload: bytes) -> dict[str, str]:
        headers = reference_headers(secret, msg_id, payload)
        del headers[name]
        return headers

    return make


def _signed_with_other(secret: str, msg_id: str, payload: bytes) -> dict[str, str]:
    return reference_headers(OTHER, msg_id, payload)


def _tampered(secret: str, msg_id: str, payload: bytes) -> dict[str, str]:
    return reference_headers(secret, msg_id, payload.replace(b"x=2", b"x=9"))


BAD_HEADERS = {
    "none": (lambda secret, msg_id, payload: {}, "missing signature header"),
    "no id": (_drop("webhook-id"), "missing signature header(s): webhook-id"),
    "no timestamp": (_drop("webhook-timestamp"), "webhook-timestamp"),
    "no signature": (_drop("webhook-signature"), "webhook-signature"),
    "other key": (_signed_with_other, "no valid signature"),
    "tampered payload": (_tampered, "no valid signature"),
    "stale": (_stale, "too old"),
    "future": (_future, "too far in the future"),
    "garbage signature": (_replace(**{"webhook-signature": "v1,!!!! v2,xyz nonsense"}), "no valid"),
    "asymmetric only": (_replace(**{"webhook-signature": "v1a,AAAA"}), "no valid signature"),
    "float timestamp": (
        _replace(**{"webhook-timestamp": "1700000000.5"}),
        "invalid webhook-timestamp",
    ),
    "dotted id": (_replace(**{"webhook-id": "a.b"}), "invalid webhook-id"),
}


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_signature_is_401_and_the_task_does_not_run(
    served: Any, method: str, case: str
) -> None:
    server, runs = served(signing_secret=SECRET)
    make, reason = BAD_HEADERS[case]
    payload = b"x=2&y=3"
    headers = make(SECRET, new_id(), payload)
    if method == "GET":
        status, answer, _ = send(server, "GET", "/add?x=2&y=3", headers)
    else:
        status, answer, _ = send(server, "POST", "/add", headers | {"Content-Type": FORM}, payload)
    assert status == 401
    assert answer["status"] == "failure"
    assert reason in answer["reason"]
    assert runs["add"] == 0


def test_unsigned_request_to_an_unknown_path_is_401(served: Any) -> None:
    server, _ = served(signing_secret=SECRET)
    status, answer, _ = send(server, "GET", "/nope", {})
    assert status == 401
    assert answer["status"] == "failure"
    assert send(server, "GET", "/", {})[1]["retval"] == ["add", "sub"]  # the index stays open


def test_tolerance_is_configurable(served: Any) -> None:
    strict, strict_runs = served(signing_secret=SECRET, signing_tolerance=10)
    lenient, lenient_runs = served(signing_secret=SECRET)
    query = b"x=1&y=1"
    minute_ago = datetime.now(tz=timezone.utc) - timedelta(seconds=60)
    status, answer, _ = send(
        strict, "GET", "/add?x=1&y=1", reference_headers(SECRET, new_id(), query, minute_ago)
    )
    assert (status, strict_runs["add"]) == (401, 0)
    assert answer["reason"] == "webhook-timestamp too old (tolerance 10 s)"
    status, _, _ = send(
        lenient, "GET", "/add?x=1&y=1", reference_headers(SECRET, new_id(), query, minute_ago)
    )
    assert (status, lenient_runs["add"]) == (200, 1)


def test_replayed_webhook_id_is_refused(served: Any) -> None:
    server, runs = served(signing_secret=SECRET)
    msg_id, query = new_id(), b"x=1&y=2"
    headers = reference_headers(SECRET, msg_id, query)
    assert send(server, "GET", "/add?x=1&y=2", headers)[0] == 200
    status, answer, _ = send(server, "GET", "/add?x=1&y=2", headers)  # the same request again
    assert (status, answer["reason"]) == (401, "replayed webhook-id: already received")
    # re-signed with a new timestamp, or sent to another task: the id is still spent
    later = datetime.now(tz=timezone.utc) + timedelta(seconds=2)
    assert (
        send(server, "GET", "/add?x=1&y=2", reference_headers(SECRET, msg_id, query, later))[0]
        == 401
    )
    assert send(server, "GET", "/sub?x=1&y=2", reference_headers(SECRET, msg_id, query))[0] == 401
    assert runs == Counter({"add": 1})


def test_a_refused_request_does_not_spend_its_id(served: Any) -> None:
    server, runs = served(signing_secret=SECRET)
    msg_id, query = new_id(), b"x=1&y=2"
    assert send(server, "GET", "/add?x=1&y=2", reference_headers(OTHER, msg_id, query))[0] == 401
    assert send(server, "GET", "/add?x=1&y=2", reference_headers(SECRET, msg_id, query))[0] == 200
    assert runs["add"] == 1


def test_full_replay_cache_refuses_new_ids(served: Any) -> None:
    server, runs = served(signing_secret=SECRET, signing_replay_max=2)
    query = b"x=1&y=2"
    for _ in range(2):
        assert (
            send(server, "GET", "/add?x=1&y=2", reference_headers(SECRET, new_id(), query))[0]
            == 200
        )
    status, answer, response = send(
        server, "GET", "/add?x=1&y=2", reference_headers(SECRET, new_id(), query)
    )
    assert status == 503
    assert "replay window" in answer["reason"]
    assert 1 <= int(response.headers["Retry-After"]) <= 301
    assert runs["add"] == 2


def test_replay_cache_forgets_ids_once_their_timestamp_is_stale() -> None:
    cache = ReplayCache(max_entries=1)
    cache.add("a", expires=100.0, path="/t", now=0.0)
    with pytest.raises(Refused) as caught:
        cache.add("a", expires=100.0, path="/t", now=50.0)
    assert caught.value.status == 401
    with pytest.raises(Refused) as caught:
        cache.add("b", expires=150.0, path="/t", now=50.0)
    assert (caught.value.status, caught.value.headers) == (503, [("Retry-After", "50")])
    cache.add("b", expires=200.0, path="/t", now=100.5)  # "a" expired: room again
    assert len(cache) == 1


def test_signed_post_with_a_query_string_is_refused(served: Any) -> None:
    server, runs = served(signing_secret=SECRET)
    body = b"y=2"
    headers = reference_headers(SECRET, new_id(), body) | {"Content-Type": FORM}
    status, answer, _ = send(server, "POST", "/add?x=1", headers, body)
    assert status == 400
    assert "query string would not be covered" in answer["reason"]
    assert runs["add"] == 0


def test_signing_options_need_a_secret() -> None:
    with pytest.raises(ValueError, match="need signing_secret"):
        TaskApp(signing_tolerance=10)
    with pytest.raises(ValueError, match="signing_tolerance"):
        TaskApp(signing_secret=SECRET, signing_tolerance=0)
    with pytest.raises(ValueError, match="signing_replay_max"):
        TaskApp(signing_secret=SECRET, signing_replay_max=0)


# -- the gateway -------------------------------------------------------------------------


def _wait_for_result(server: TaskServer, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        status, answer, _ = send(server, "GET", f"/{task_id}/status", {})
        assert status == 200
        if answer["task"]["status"] in ("SUCCESS", "FAILURE"):
            task: dict[str, Any] = answer["task"]
            return task
        time.sleep(0.01)
    raise AssertionError(f"task {task_id} did not finish in {TIMEOUT} s")


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_gateway_apply_is_verified_and_its_callback_signed(served: Any, method: str) -> None:
    server, runs = served(signing_secret=SECRET, gateway=True)
    payload = b"x=5&y=6"
    target = "/apply/add?x=5&y=6" if method == "GET" else "/apply/add"
    body = None if method == "GET" else payload
    extra = {} if method == "GET" else {"Content-Type": FORM}
    assert send(server, method, target, extra, body)[0] == 401  # unsigned
    # A dispatchkit client sends its task id as both Idempotency-Key and webhook-id.
    task_id = new_id()
    headers = reference_headers(SECRET, task_id, payload) | extra | {"Idempotency-Key": task_id}
    status, answer, _ = send(server, method, target, headers, body)
    assert (status, answer["task_id"]) == (200, task_id)
    task = _wait_for_result(server, task_id)
    assert (task["status"], task["result"]) == ("SUCCESS", 11)
    # The captured apply is spent: not again, not at the task, not at another task.
    assert send(server, method, target, headers, body)[0] == 401
    sub = "/sub?x=5&y=6" if method == "GET" else "/sub"
    assert send(server, method, sub, headers, body)[0] == 401
    assert send(server, method, "/apply/sub" + target[len("/apply/add") :], headers, body)[0] == 401
    assert runs == Counter({"add": 1})


# -- the helper -----------------------------------------------------------------------------


def test_verify_helper() -> None:
    keys = SigningKeys.parse(SECRET)
    payload = b'{"event":"paid"}'
    headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": "1700000000"}
    headers["Webhook-Signature"] = keys.signature("msg_1", "1700000000", payload)
    verify(headers, payload, SECRET, now=1700000000)
    verify(headers, payload.decode(), [OTHER, SECRET], now=1700000100)
    assert check(headers, payload, keys, 300, 1700000000) == ("msg_1", 1700000000)
    with pytest.raises(SignatureError, match="too old"):
        verify(headers, payload, SECRET, now=1700000301)
    verify(headers, payload, SECRET, tolerance=400, now=1700000301)
    with pytest.raises(SignatureError, match="no valid signature"):
        verify(headers, payload + b" ", SECRET, now=1700000000)
    with pytest.raises(UsageError, match="tolerance"):
        verify(headers, payload, SECRET, tolerance=-1)
    # interoperable: the reference signs the same bytes
    when = datetime.fromtimestamp(1700000000, tz=timezone.utc)
    assert headers["Webhook-Signature"] == Webhook(SECRET).sign("msg_1", when, payload.decode())


def test_request_payload_rule() -> None:
    assert request_payload("POST", "http://h/t?a=1", b"x=1") == b"x=1"
    assert request_payload("PATCH", "http://h/t", None) == b""
    assert request_payload("GET", "http://h/t?a=1&b=2#f", None) == b"a=1&b=2"
    assert request_payload("head", "http://h/t?", None) == b""
    assert request_payload("OPTIONS", "http://h/t", None) == b""


# -- secrets never leak ----------------------------------------------------------------------


def _secret_texts(secrets: Iterable[str]) -> list[str]:
    texts = []
    for secret in secrets:
        encoded = secret.removeprefix("whsec_")
        texts += [encoded, encoded.rstrip("="), repr(base64.b64decode(encoded))[2:-1]]
    return texts


class Keep:
    """Keeps what the call_done hook saw, to look at the requests' reprs."""

    name = "keep"

    def __init__(self) -> None:
        self.shown: list[str] = []

    @hookimpl
    def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
        self.shown += [repr(request), str(request), repr(outcome), str(outcome.error)]


def test_secrets_never_appear_in_reprs_errors_or_logs(
    served: Any, recorder: tuple[Recorder, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, url = recorder
    server, _ = served(signing_secret=OTHER, gateway=True)
    keep = Keep()
    shown: list[str] = []
    with Dispatcher(signing_secret=[SECRET, OLD], plugins=[keep], retry_backoff=0.01) as d:
        d.call(f"{url}/task", x=1)
        for target in (f"{server.url}/add", f"{server.url}/apply/add"):
            with pytest.raises(RemoteExecuteError) as refused:
                d.call(target, "POST", x=1, y=2)
            shown += [str(refused.value), repr(refused.value)]
        with pytest.raises(SignatureError) as unsignable:
            d.apply(f"{url}/task", "GET", {}, task_id="has.dot")
        shown += [str(unsignable.value), repr(unsignable.value), repr(d)]
        (info,) = [p for p in d.plugins if p.name == "signing"]
        shown += [repr(info), repr(info.plugin)]
    for bad in ("whsec_" + SECRET[6:-4] + "!!!!", SECRET[6:]):
        with pytest.raises(UsageError) as caught:
            Dispatcher(signing_secret=[OLD, bad])
        shown.append(str(caught.value))
    shown += [repr(SigningKeys.parse([SECRET, OLD])), str(SigningKeys.parse(SECRET))]
    with Dispatcher(signing_secret=SigningKeys.parse(SECRET)) as parsed:
        shown.append(repr(parsed.settings))  # parsed keys keep even the settings masked
    assert "whsec_***" in repr(SigningKeys.parse(SECRET))
    everything = "\n".join([*shown, *keep.shown, caplog.text])
    assert "webhook-signature': '***'" in "".join(keep.shown)
    for text in _secret_texts([SECRET, OLD, OTHER]):
        assert text not in everything


def test_reference_verifies_what_reaches_a_non_python_peer(signer: Dispatcher, peer: str) -> None:
    echo = signer.call(f"{peer}/echo", "POST", x="1", y="a b")
    assert echo["body"] == "x=1&y=a+b"
    Webhook(SECRET).verify(echo["body"], echo["headers"], json_parse=False)
