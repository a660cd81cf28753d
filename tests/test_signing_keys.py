"""One key per receiver: calls name their signing key, the sending machine holds it.

Receivers are real TaskApps on 127.0.0.1, each verifying with its own key;
tasks count their runs, so "refused" always means "did not run". A recording
WSGI app captures what goes on the wire. Every test that sends runs on both
drivers (the Dispatcher and the AsyncDispatcher). The Celery test starts a
worker whose keys come from its own environment, never from the message.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pytest
from dispatchkit_celery.testing import REDIS_URL, celery_worker, redis_reachable
from standardwebhooks import Webhook, WebhookVerificationError

from conftest import require
from dispatchkit import (
    Attempt,
    Call,
    Dispatcher,
    DispatchError,
    HttpDispatchTask,
    RemoteExecuteError,
    Request,
    UsageError,
    hookimpl,
)
from dispatchkit.server import TaskApp, TaskServer
from dispatchkit.signing import KeyStore, SigningKeys, generate_secret
from support.drivers import DRIVERS, AsyncClient, Client, make_client

ACME = generate_secret()
GLOBEX = generate_secret()
DEFAULT = generate_secret()
NEW = generate_secret()
OLD = generate_secret()
ALL = (ACME, GLOBEX, DEFAULT, NEW, OLD)
KEYS = {"acme": ACME, "globex": GLOBEX}
FAST: dict[str, Any] = {"timeout": 5, "retry_backoff": 0.01}


def texts_of(secrets: Iterable[str]) -> list[str]:
    """Every form a secret could leak in: base64 with and without padding, the raw bytes."""
    texts = []
    for secret in secrets:
        encoded = secret.removeprefix("whsec_")
        texts += [encoded, encoded.rstrip("="), repr(base64.b64decode(encoded))[2:-1]]
    return texts


def assert_no_secret(text: str) -> None:
    for secret in texts_of(ALL):
        assert secret not in text


# -- servers ----------------------------------------------------------------------------


class Recorder:
    """A WSGI app that records each request's headers, query and body, and answers success."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], str, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        headers = {
            key[5:].replace("_", "-").lower(): str(value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        with self._lock:
            self.seen.append((headers, environ.get("QUERY_STRING", ""), body))
        data = b'{"status": "success", "retval": "ok"}'
        start_response("200 OK", [("Content-Type", "application/json")])
        return [data]


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    app = Recorder()
    with TaskServer(app) as server:
        yield app, server.url


@pytest.fixture
def receiver() -> Iterator[Any]:
    """``receiver(secret)``: a TaskApp that verifies with ``secret``; its URL and run counts."""
    made: list[tuple[TaskApp, TaskServer]] = []

    def serve(secret: Any) -> tuple[str, Counter[str]]:
        runs: Counter[str] = Counter()
        lock = threading.Lock()
        app = TaskApp(signing_secret=secret)

        @app.task
        def add(x: int, y: int) -> int:
            with lock:
                runs["add"] += 1
            return x + y

        server = app.server(port=0).start()
        made.append((app, server))
        return server.url, runs

    yield serve
    for app, server in made:
        server.stop()
        app.close()


@pytest.fixture(params=DRIVERS)
def client_of(request: pytest.FixtureRequest) -> Iterator[Any]:
    """``client_of(**settings)``: a client of the test's driver; all are closed after it."""
    made: list[Client] = []

    def make(**settings: Any) -> Client:
        client = make_client(request.param, **FAST, **settings)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def apply(client: Client, url: str, method: str = "GET", kwargs: Any = None, **options: Any) -> Any:
    """``apply(..., options=...)`` on either driver (the drivers' ``apply`` has no options)."""
    dispatcher = client.dispatcher  # type: ignore[attr-defined]
    if isinstance(client, AsyncClient):
        return client.run(dispatcher.apply(url, method, kwargs, **options))
    return dispatcher.apply(url, method, kwargs, **options)


def execute(client: Client, call: Call, attempts: list[Attempt]) -> Any:
    dispatcher = client.dispatcher  # type: ignore[attr-defined]
    if isinstance(client, AsyncClient):
        return client.run(dispatcher.execute(call, attempts=attempts))
    return dispatcher.execute(call, attempts=attempts)


def signatures(headers: Mapping[str, str]) -> list[str]:
    return headers["webhook-signature"].split(" ")


# -- the two-receiver example -------------------------------------------------------------


def test_one_dispatcher_signs_for_two_receivers(client_of: Any, receiver: Any) -> None:
    acme, acme_runs = receiver(ACME)
    globex, globex_runs = receiver(GLOBEX)
    client = client_of(signing_keys=KEYS)
    to_acme = {"options": {"signing_key": "acme"}}
    to_globex = {"options": {"signing_key": "globex"}}
    assert apply(client, f"{acme}/add", "POST", {"x": 1, "y": 2}, **to_acme) == 3
    assert apply(client, f"{acme}/add", "GET", {"x": 2, "y": 2}, **to_acme) == 4
    assert apply(client, f"{globex}/add", "POST", {"x": 3, "y": 4}, json=True, **to_globex) == 7
    # Each receiver knows its own key only: acme's key does not open globex.
    with pytest.raises(RemoteExecuteError, match="no valid signature") as refused:
        apply(client, f"{globex}/add", "POST", {"x": 1, "y": 1}, **to_acme)
    assert refused.value.status == 401
    assert (acme_runs["add"], globex_runs["add"]) == (2, 1)


def test_an_unknown_key_id_fails_before_anything_is_sent(
    client_of: Any, recorder: tuple[Recorder, str], receiver: Any
) -> None:
    app, url = recorder
    client = client_of(signing_keys=KEYS)
    records: list[Attempt] = []
    call = Call(f"{url}/task", "POST", {"x": 1}, "call-1", options={"signing_key": "initech"})
    with pytest.raises(UsageError, match="unknown signing key 'initech'") as caught:
        execute(client, call, records)
    assert (caught.value.task_id, caught.value.method) == ("call-1", "POST")
    (record,) = records  # recorded as one failed attempt, never retried
    assert (record.outcome, record.status) == ("UsageError", None)
    assert record.error is not None
    assert "unknown signing key 'initech'" in record.error
    # No key named and no default key: refused too, never sent unsigned.
    with pytest.raises(UsageError, match="names no signing key"):
        apply(client, f"{url}/task", "GET", {"x": 1})
    assert app.seen == []


def test_the_default_key_signs_calls_that_name_none(
    client_of: Any, recorder: tuple[Recorder, str]
) -> None:
    app, url = recorder
    client = client_of(signing_secret=DEFAULT, signing_keys=KEYS)
    apply(client, f"{url}/task", "POST", {"x": 1})
    apply(client, f"{url}/task", "POST", {"x": 1}, options={"signing_key": "globex"})
    (default_headers, _, body), (named_headers, _, _) = app.seen
    Webhook(DEFAULT).verify(body, default_headers, json_parse=False)
    # A named key replaces the default: one signature, by that key only.
    assert len(signatures(named_headers)) == 1
    Webhook(GLOBEX).verify(body, named_headers, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(DEFAULT).verify(body, named_headers, json_parse=False)


def test_naming_a_key_without_signing_keys_is_a_usage_error(
    client_of: Any, recorder: tuple[Recorder, str]
) -> None:
    app, url = recorder
    client = client_of(signing_secret=DEFAULT)
    with pytest.raises(UsageError, match="has no signing_keys"):
        apply(client, f"{url}/task", options={"signing_key": "acme"})
    assert app.seen == []


def test_rotation_signs_with_both_keys_and_either_receiver_accepts(
    client_of: Any, recorder: tuple[Recorder, str], receiver: Any
) -> None:
    app, url = recorder
    client = client_of(signing_keys={"acme": [NEW, OLD], "globex": GLOBEX})
    rotating = {"options": {"signing_key": "acme"}}
    apply(client, f"{url}/task", "POST", {"x": 1}, **rotating)
    ((headers, _, body),) = app.seen
    assert len(signatures(headers)) == 2
    for secret in (NEW, OLD):
        Webhook(secret).verify(body, headers, json_parse=False)
    # A receiver already on the new key, one still on the old, one with both: all accept.
    for keys in (NEW, OLD, [NEW, OLD]):
        target, runs = receiver(keys)
        assert apply(client, f"{target}/add", "POST", {"x": 1, "y": 1}, **rotating) == 2
        assert runs["add"] == 1


# -- where the keys come from --------------------------------------------------------------


def test_keys_from_the_environment(
    client_of: Any, receiver: Any, recorder: tuple[Recorder, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCHKIT_SIGNING_KEY_ACME_EU", f"{NEW}, {OLD}")  # a rotation
    monkeypatch.setenv("DISPATCHKIT_SIGNING_KEY_BROKEN", "whsec_not-base64!")
    target, runs = receiver(OLD)
    client = client_of(signing_keys="env")
    assert (
        apply(client, f"{target}/add", "GET", {"x": 1, "y": 2}, options={"signing_key": "acme-eu"})
        == 3
    )
    assert runs["add"] == 1
    _, url = recorder
    with pytest.raises(UsageError, match="DISPATCHKIT_SIGNING_KEY_NOPE is not set") as unknown:
        apply(client, f"{url}/task", options={"signing_key": "nope"})
    with pytest.raises(UsageError, match="DISPATCHKIT_SIGNING_KEY_BROKEN #1 is not valid") as bad:
        apply(client, f"{url}/task", options={"signing_key": "broken"})
    assert recorder[0].seen == []
    assert_no_secret(f"{unknown.value} {bad.value}")


def test_keys_from_a_function(client_of: Any, receiver: Any) -> None:
    vault = {"acme": ACME}
    asked: list[str] = []

    def lookup(key_id: str) -> str | None:
        asked.append(key_id)
        return vault.get(key_id)

    target, runs = receiver(ACME)
    client = client_of(signing_keys=lookup)
    assert (
        apply(client, f"{target}/add", options={"signing_key": "acme"}, kwargs={"x": 1, "y": 1})
        == 2
    )
    with pytest.raises(UsageError, match="unknown signing key 'globex'"):
        apply(client, f"{target}/add", options={"signing_key": "globex"}, kwargs={"x": 1, "y": 1})
    assert asked == ["acme", "globex"]
    assert runs["add"] == 1


def test_signing_keys_alone_loads_the_plugin() -> None:
    with Dispatcher(signing_keys=KEYS) as d:
        (info,) = [p for p in d.plugins if p.name == "signing"]
        assert info.hooks == ("dispatchkit_configure", "dispatchkit_prepare_request")
        assert repr(info.plugin) == (
            "<signing None signing_keys=KeyStore({'acme': SigningKeys(whsec_***), "
            "'globex': SigningKeys(whsec_***)})>"
        )
    with pytest.raises(UsageError, match="signing_keys"):  # nothing reads it then
        Dispatcher(signing_keys=KEYS, disable=["signing"])


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (ACME, "takes a mapping of key ids to secrets"),  # one secret, given by mistake
        ({}, "signing_keys is empty"),
        ({"has space": ACME}, "key id #1 is not"),
        ({"acme": ACME, "globex": "whsec_c2hvcnQ="}, r"signing_keys\['globex'\] is 5 bytes"),
        ({"acme": []}, r"signing_keys\['acme'\] is an empty list"),
        (42, "got int"),
    ],
)
def test_bad_signing_keys_are_usage_errors(keys: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        Dispatcher(signing_keys=keys)
    assert_no_secret(str(caught.value))


def test_a_key_store_is_parsed_once_and_shows_no_key() -> None:
    store = KeyStore.parse({"acme": [NEW, OLD]})
    assert KeyStore.parse(store) is store
    assert store.resolve("acme") == SigningKeys.parse([NEW, OLD])
    assert repr(store) == "KeyStore({'acme': SigningKeys(whsec_***, whsec_***)})"
    assert repr(KeyStore.parse("env")) == "KeyStore(env=DISPATCHKIT_SIGNING_KEY_*)"
    assert KeyStore.from_env("MYAPP_KEY_").env_name("acme-eu.2") == "MYAPP_KEY_ACME_EU_2"
    with pytest.raises(UsageError, match="not a key id"):  # and not shown: it may be a secret
        store.resolve(ACME.removeprefix("whsec_"))
    with pytest.raises(UsageError, match="not a variable name"):
        KeyStore.from_env("1-bad")


# -- options: what they may hold, where they go ----------------------------------------------


class ReadsOptions:
    """A plugin that reads an option of its own in prepare_request."""

    name = "reads-options"

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self.seen.append(dict(request.options))
        tenant = request.options.get("tenant")
        if tenant is not None:
            request.headers["X-Tenant"] = tenant


def test_plugins_read_options_and_the_core_never_sends_them(
    client_of: Any, recorder: tuple[Recorder, str]
) -> None:
    app, url = recorder
    plugin = ReadsOptions()
    client = client_of(plugins=[plugin])
    options = {"tenant": "t-42", "note": "a value no one sends"}
    apply(client, f"{url}/task", "POST", {"x": 1}, options=options)
    apply(client, f"{url}/task", "GET", {"x": 1})
    assert plugin.seen == [options, {}]
    (headers, query, body), (plain, _, _) = app.seen
    assert headers["x-tenant"] == "t-42"  # the plugin's doing
    wire = json.dumps([headers, query, body.decode()])
    assert "a value no one sends" not in wire
    assert "note" not in wire
    assert "x-tenant" not in plain


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["signing_key", "acme"], "options must be a mapping"),
        ({"Signing-Key": "acme"}, "option name 'Signing-Key'"),
        ({"": "acme"}, "option name ''"),
        ({"signing_key": 7}, "the value must be a str, got int"),
        ({"signing_key": "a\nb"}, "printable ASCII"),
        ({"signing_key": "é"}, "printable ASCII"),
        ({"signing_key": "x" * 257}, "at most 256 printable ASCII characters"),
        ({f"o{n}": "v" for n in range(33)}, "at most 32 options"),
        ({"signing_key": ACME}, "holds a signing secret"),
    ],
)
def test_bad_options_are_refused_before_sending_or_queueing(
    recorder: tuple[Recorder, str], options: Any, message: str
) -> None:
    app, url = recorder
    with Dispatcher(signing_keys=KEYS, **FAST) as d:
        with pytest.raises(UsageError, match=message) as caught:
            d.apply(f"{url}/task", options=options)
        assert_no_secret(str(caught.value))
        with pytest.raises(UsageError, match=message):
            d.apply_async(f"{url}/task", options=options)  # in the caller, before queueing
    assert app.seen == []


def test_a_call_keeps_its_options_through_json() -> None:
    call = Call(
        "http://h/t", "POST", {"x": 1}, "id-1", 2.5, {"X-A": "b"}, True, {"signing_key": "acme"}
    )
    data = json.loads(json.dumps(call.to_dict()))
    assert data["options"] == {"signing_key": "acme"}
    assert Call.from_dict(data) == call
    assert_no_secret(json.dumps(data))
    # A call without options leaves the key out: an older worker still reads it.
    plain = Call("http://h/t", task_id="id-2")
    assert "options" not in plain.to_dict()
    assert Call.from_dict(plain.to_dict()) == plain


def test_every_sync_entry_point_carries_options(receiver: Any) -> None:
    target, runs = receiver(ACME)
    acme = {"signing_key": "acme"}
    with Dispatcher(signing_keys=KEYS, **FAST) as d:
        assert d.apply_async(f"{target}/add", "POST", {"x": 1, "y": 2}, options=acme).get(10) == 3
        assert d.map(f"{target}/add", [{"x": 1, "y": n} for n in range(3)], options=acme) == [
            1,
            2,
            3,
        ]
        compat = HttpDispatchTask.apply_async(
            kwargs={"url": f"{target}/add", "x": 2, "y": 2}, dispatcher=d, options=acme
        )
        assert compat.get(10) == 4
        unknown = d.apply_async(f"{target}/add", kwargs={"x": 1}, options={"signing_key": "x"})
        with pytest.raises(UsageError, match="unknown signing key 'x'"):
            unknown.get(10)
    assert runs["add"] == 5


# -- no secret anywhere -----------------------------------------------------------------------


class Keep:
    """Keeps what the per-attempt and per-call hooks saw."""

    name = "keep"

    def __init__(self) -> None:
        self.shown: list[str] = []

    @hookimpl
    def dispatchkit_attempt_done(self, request: Request, attempt: Attempt) -> None:
        self.shown += [repr(request), json.dumps(attempt.to_dict())]

    @hookimpl
    def dispatchkit_call_done(self, request: Request, outcome: Any) -> None:
        self.shown += [repr(request), repr(outcome), str(outcome.error)]


def test_no_secret_in_messages_results_records_reprs_or_logs(
    receiver: Any, recorder: tuple[Recorder, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, url = recorder
    acme, _ = receiver(ACME)
    keep = Keep()
    shown: list[str] = []
    records: list[Attempt] = []
    keys = {"acme": ACME, "globex": [NEW, OLD]}
    with Dispatcher(signing_secret=DEFAULT, signing_keys=keys, plugins=[keep], **FAST) as d:
        calls = [
            Call(f"{acme}/add", "POST", {"x": 1, "y": 2}, options={"signing_key": "acme"}),
            Call(f"{acme}/add", "POST", {"x": 1, "y": 2}, options={"signing_key": "globex"}),
            Call(f"{url}/task", options={"signing_key": "unknown"}),
            Call(f"{url}/task"),
        ]
        for call in calls:
            shown.append(json.dumps(call.to_dict()))  # what a broker message holds
            result = d.apply_async(call.url, call.method, call.kwargs, options=call.options)
            value = result.get(timeout=10, propagate=False)
            shown += [repr(value), str(value), repr(result)]
            try:
                d.execute(call, attempts=records)
            except DispatchError as exc:
                shown += [repr(exc), str(exc), json.dumps(exc.to_dict())]
        shown += [repr(d.settings), repr(d), *(repr(p.plugin) for p in d.plugins)]
    shown += [json.dumps(r.to_dict()) for r in records]
    assert {r.outcome for r in records} == {"200", "401", "UsageError"}
    everything = "\n".join([*shown, *keep.shown, caplog.text])
    assert "signing_keys': '***'" in everything  # the settings' repr
    assert "unknown signing key 'unknown'" in everything  # the failures are there ...
    assert_no_secret(everything)  # ... and no key


# -- Celery: the worker's keys come from its own environment ---------------------------------


def test_a_celery_worker_signs_with_keys_from_its_environment(
    receiver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(redis_reachable(), f"Redis is not reachable at {REDIS_URL}")
    queue = f"dispatchkit-test-keys-{uuid.uuid4().hex[:8]}"
    target, runs = receiver(ACME)
    # Only the worker's environment holds the key: set while it starts, gone after.
    monkeypatch.setenv("DISPATCHKIT_SIGNING_KEY_ACME", ACME)
    settings = {"timeout": 10, "signing_keys": "env"}
    with celery_worker(queue, concurrency=1, worker_settings=settings, timeout=30) as worker:
        monkeypatch.delenv("DISPATCHKIT_SIGNING_KEY_ACME")
        with Dispatcher(
            executor="celery", celery_broker=REDIS_URL, celery_queue=queue, retry_schedule=None
        ) as d:  # the caller has no key at all
            assert "signing" not in [p.name for p in d.plugins]
            signed = d.apply_async(
                f"{target}/add", "POST", {"x": 2, "y": 3}, options={"signing_key": "acme"}
            )
            assert signed.get(timeout=20) == 5
            unknown = d.apply_async(
                f"{target}/add", "POST", {"x": 2, "y": 3}, options={"signing_key": "globex"}
            )
            with pytest.raises(UsageError, match="DISPATCHKIT_SIGNING_KEY_GLOBEX is not set"):
                unknown.get(timeout=20)
        assert_no_secret("\n".join(worker.log))
    assert runs["add"] == 1
