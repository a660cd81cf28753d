"""The HTTP gateway (/apply/<name>, /<id>/status, /<id>/done) over real sockets.

Every app runs on a real TaskServer on 127.0.0.1 and applies through a real
Dispatcher's thread executor, which calls the app's own task endpoints. Every
wait is bounded: polling loops give up after TIMEOUT seconds.
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import require
from dispatchkit import Dispatcher, Outcome, Request, hookimpl
from dispatchkit.server import TaskApp, TaskServer
from dispatchkit.server._gateway import Gateway, route
from dispatchkit.server._http import Origin, asgi_request, wsgi_request
from dispatchkit.server._store import ResultStore, StoreFull
from support.node_peer import NODE

TIMEOUT = 10.0
POLL = 0.01
READY = ("SUCCESS", "FAILURE")
HEX_ID = re.compile(r"[0-9a-f]{32}")
FORM = "application/x-www-form-urlencoded"
CLIENT_SCRIPT = Path(__file__).resolve().parent.parent / "peers" / "gateway_client.mjs"


@dataclass
class Probe:
    """What the tasks saw: calls per task, and a gate the slow task waits on."""

    calls: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def count(self, name: str) -> None:
        with self.lock:
            self.calls[name] += 1


def make_app(probe: Probe, **options: Any) -> TaskApp:
    options.setdefault("gateway", True)
    app = TaskApp(**options)

    @app.task
    def multiply(x: int, y: int) -> int:
        probe.count("multiply")
        return x * y

    @app.task
    def total(xs: list[int]) -> int:
        return sum(xs)

    @app.task
    def describe(**received: Any) -> dict[str, Any]:
        return received

    @app.task
    def wait() -> str:
        probe.started.set()
        probe.release.wait(TIMEOUT)
        probe.count("wait")
        return "released"

    @app.task
    def hold(payload: str) -> int:  # a running call that holds its arguments
        probe.count("hold")
        probe.release.wait(TIMEOUT)
        return len(payload)

    @app.task
    def boom() -> None:
        raise RuntimeError("kaput")

    @app.task(name="apply")
    def apply_task(x: int) -> int:  # a task named like the gateway's route
        return -x

    return app


class Client:
    """One kept-alive HTTP/1.1 connection to a gateway, and the server it talks to."""

    def __init__(self, server: TaskServer) -> None:
        self.server = server
        self.conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)

    @classmethod
    def to(cls, port: int) -> Client:
        """A client of a server in another process, on 127.0.0.1:``port``."""
        return cls(TaskServer(TaskApp(), port=port))  # not started: only its address

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[http.client.HTTPResponse, Any]:
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        raw = response.read()
        return response, json.loads(raw) if raw else None

    def apply(self, name: str, query: str = "", **headers: str) -> str:
        response, answer = self.request("GET", f"/apply/{name}?{query}", headers=headers)
        assert response.status == 200, answer
        assert answer["ok"] == "true"
        task_id: str = answer["task_id"]
        return task_id

    def status(self, task_id: str) -> dict[str, Any]:
        response, answer = self.request("GET", f"/{task_id}/status")
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        task: dict[str, Any] = answer["task"]
        assert task["id"] == task_id
        return task

    def done(self, task_id: str) -> bool:
        response, answer = self.request("GET", f"/{task_id}/done")
        assert response.status == 200
        assert answer["task"]["id"] == task_id
        executed: bool = answer["task"]["executed"]
        return executed

    def wait(self, task_id: str, states: tuple[str, ...] = READY) -> dict[str, Any]:
        """Poll the status until it is one of ``states``; fail after TIMEOUT seconds."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            task = self.status(task_id)
            if task["status"] in states:
                return task
            if time.monotonic() > deadline:
                pytest.fail(f"task {task_id} still {task['status']} after {TIMEOUT}s")
            time.sleep(POLL)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def probe() -> Iterator[Probe]:
    probe = Probe()
    yield probe
    probe.release.set()  # a test that failed early leaves no task blocked


@pytest.fixture
def serve(probe: Probe) -> Iterator[Callable[..., tuple[TaskApp, Client]]]:
    """Start gateway apps on loopback; close each app (its calls finish), then its server."""
    running: list[tuple[TaskApp, TaskServer, Client]] = []

    def start(**options: Any) -> tuple[TaskApp, Client]:
        app = make_app(probe, **options)
        server = app.server(port=0).start()
        client = Client(server)
        running.append((app, server, client))
        return app, client

    yield start
    probe.release.set()
    for app, server, client in running:
        client.close()
        app.close()
        server.stop()


@pytest.fixture
def client(serve: Callable[..., tuple[TaskApp, Client]]) -> Client:
    return serve()[1]


# -- applying ---------------------------------------------------------------------------


def test_apply_by_get(client: Client) -> None:
    response, answer = client.request("GET", "/apply/multiply?x=6&y=7")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Content-Length"] == str(len(json.dumps(answer, separators=(",", ":"))))
    assert answer == {"ok": "true", "task_id": answer["task_id"]}
    assert HEX_ID.fullmatch(answer["task_id"])
    task = client.wait(answer["task_id"])
    assert task == {"id": answer["task_id"], "status": "SUCCESS", "result": 42}
    assert client.done(answer["task_id"]) is True


def test_apply_by_form_post(client: Client) -> None:
    response, answer = client.request(
        "POST",
        "/apply/multiply",
        body="x=6&y=7",
        headers={"Content-Type": FORM},
    )
    assert response.status == 200
    assert client.wait(answer["task_id"])["result"] == 42


def test_apply_by_json_post(client: Client) -> None:
    response, answer = client.request(
        "POST",
        "/apply/total",
        body='{"xs": [1, 2, 3]}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 200
    assert client.wait(answer["task_id"])["result"] == 6


def test_json_values_are_forwarded_as_json_with_the_query_underneath(client: Client) -> None:
    body = {"n": 1, "flag": True, "obj": {"a": [1, 2]}, "none": None, "q": "body wins"}
    _, answer = client.request(
        "POST",
        "/apply/describe?q=query&extra=text",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    task = client.wait(answer["task_id"])
    assert task["status"] == "SUCCESS"
    assert task["result"] == {**body, "extra": "text"}


def test_query_and_form_body_merge_and_repeated_keys_stay_lists(client: Client) -> None:
    task_id = client.apply("total", "xs=1&xs=2&xs=3")
    assert client.wait(task_id)["result"] == 6
    _, answer = client.request(
        "POST", "/apply/multiply?x=6&y=1", body="y=7", headers={"Content-Type": FORM}
    )
    assert client.wait(answer["task_id"])["result"] == 42


def test_running_task_is_started_and_not_done_until_it_returns(
    client: Client, probe: Probe
) -> None:
    task_id = client.apply("wait")
    assert probe.started.wait(TIMEOUT)
    assert client.status(task_id) == {"id": task_id, "status": "STARTED", "result": None}
    assert client.done(task_id) is False
    probe.release.set()
    assert client.wait(task_id) == {"id": task_id, "status": "SUCCESS", "result": "released"}
    assert client.done(task_id) is True


class FinishesBetweenReads:
    """A call's handle whose call ends between any two reads of its state: STARTED on
    the first read, SUCCESS on every read after it (as a Celery result may)."""

    id = "finishes-between-reads"

    def __init__(self) -> None:
        self.reads = 0

    @property
    def state(self) -> str:
        self.reads += 1
        return "STARTED" if self.reads == 1 else "SUCCESS"

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        return 42 if self.reads > 1 else None

    def ready(self) -> bool:
        return self.state in READY

    def successful(self) -> bool:
        return self.state == "SUCCESS"

    def failed(self) -> bool:
        return self.state == "FAILURE"


def test_a_call_that_ends_between_two_reads_shows_success_only_with_its_result() -> None:
    gateway = Gateway(dispatcher=None, callback_url=None, results_max=10, results_max_age=60)
    handle = FinishesBetweenReads()
    assert gateway.store.add(handle.id, handle)
    first = gateway.status(handle.id)["task"]  # read once: STARTED, never SUCCESS without 42
    assert first == {"id": handle.id, "status": "STARTED", "result": None}
    assert orjson.loads(orjson.dumps(gateway.status(handle.id))) == {
        "task": {"id": handle.id, "status": "SUCCESS", "result": 42}
    }
    assert gateway.done(handle.id)["task"]["executed"] is True


def test_failing_task_reports_reason_exception_and_traceback(client: Client) -> None:
    task_id = client.apply("boom")
    task = client.wait(task_id)
    assert task["status"] == "FAILURE"
    assert task["result"] == "RuntimeError: kaput"
    assert task["exc"] == "dispatchkit.exceptions.RemoteExecuteError"
    assert task["traceback"].startswith("Traceback (most recent call last):")
    assert "RemoteExecuteError: RuntimeError: kaput" in task["traceback"]
    assert client.done(task_id) is True


def test_argument_conversion_error_is_a_failure(client: Client) -> None:
    task = client.wait(client.apply("multiply", "x=six&y=7"))
    assert task["status"] == "FAILURE"
    assert task["result"] == "argument 'x': invalid int 'six'"
    assert task["exc"] == "dispatchkit.exceptions.RemoteExecuteError"
    task = client.wait(client.apply("multiply", "x=6"))
    assert task["result"] == "missing argument 'y'"


def test_unknown_task_is_a_404_envelope_and_nothing_runs(client: Client) -> None:
    for method in ("GET", "POST", "PUT"):
        response, answer = client.request(method, "/apply/nope?x=1")
        assert response.status == 404
        assert answer == {"status": "failure", "reason": "unknown task: 'nope'"}
    response, answer = client.request("GET", "/apply/")
    assert (response.status, answer["reason"]) == (404, "unknown task: ''")


def test_unknown_id_is_pending(client: Client) -> None:
    assert client.status("never-seen") == {"id": "never-seen", "status": "PENDING", "result": None}
    assert client.done("never-seen") is False


def test_a_task_named_apply_stays_at_its_own_path(client: Client) -> None:
    response, answer = client.request("GET", "/apply?x=5")
    assert (response.status, answer) == (200, {"status": "success", "retval": -5})
    assert client.wait(client.apply("apply", "x=5"))["result"] == -5


def test_endpoints_refuse_other_methods_with_an_envelope(client: Client) -> None:
    response, answer = client.request("PUT", "/apply/multiply?x=1&y=2")
    assert response.status == 405
    assert response.headers["Allow"] == "GET, POST"
    assert answer == {"status": "failure", "reason": "method 'PUT' not allowed"}
    for path in ("/some-id/status", "/some-id/done"):
        response, answer = client.request("POST", path)
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"
        assert answer["status"] == "failure"


def test_head_of_status_has_the_length_and_no_body(client: Client) -> None:
    response, body = client.request("HEAD", "/abc/status")
    assert response.status == 200
    assert body is None
    expected = b'{"task":{"id":"abc","status":"PENDING","result":null}}'
    assert response.headers["Content-Length"] == str(len(expected))


def test_bad_bodies_are_envelopes(serve: Callable[..., tuple[TaskApp, Client]]) -> None:
    _, client = serve(max_body_bytes=16)
    response, answer = client.request(
        "POST", "/apply/multiply", body="{nope", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert answer["status"] == "failure"
    assert answer["reason"].startswith("invalid JSON body")
    response, answer = client.request("POST", "/apply/multiply", body="x=" + "1" * 100)
    assert response.status == 413
    assert answer == {"status": "failure", "reason": "request body exceeds 16 bytes"}


def test_without_the_gateway_apply_is_an_unknown_task(
    serve: Callable[..., tuple[TaskApp, Client]],
) -> None:
    _, client = serve(gateway=False)
    response, answer = client.request("GET", "/apply/multiply?x=1&y=2")
    assert response.status == 404
    assert answer == {"status": "failure", "reason": "unknown task 'apply/multiply'"}
    response, _ = client.request("GET", "/abc/status")
    assert response.status == 404


# -- task ids ---------------------------------------------------------------------------


def test_idempotency_key_is_the_task_id_and_a_retry_does_not_run_twice(
    client: Client, probe: Probe
) -> None:
    task_id = client.apply("multiply", "x=6&y=7", **{"Idempotency-Key": "order-42"})
    assert task_id == "order-42"
    assert client.wait(task_id)["result"] == 42
    # the client retries its apply (even with other arguments): the same id, no second run
    again = client.apply("multiply", "x=1&y=1", **{"Idempotency-Key": "order-42"})
    assert again == "order-42"
    assert client.wait(task_id)["result"] == 42
    other = client.apply("multiply", "x=2&y=2")
    assert client.wait(other)["result"] == 4
    assert probe.calls["multiply"] == 2


def test_concurrent_applies_with_one_key_run_once(
    serve: Callable[..., tuple[TaskApp, Client]], probe: Probe
) -> None:
    app, client = serve()
    clients = [Client(client.server) for _ in range(8)]
    ids: list[str] = []
    try:
        threads = [
            threading.Thread(
                target=lambda c=c: ids.append(
                    c.apply("multiply", "x=3&y=3", **{"Idempotency-Key": "same"})
                )
            )
            for c in clients
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
    finally:
        for c in clients:
            c.close()
    assert ids == ["same"] * 8
    assert client.wait("same")["result"] == 9
    app.close()  # waits for every call submitted
    assert probe.calls["multiply"] == 1


@pytest.mark.parametrize("key", ["a/b", "", " ", ".hidden", "apply", "x" * 201, "a,b", "é"])
def test_invalid_idempotency_key_is_a_400(client: Client, key: str) -> None:
    response, answer = client.request(
        "GET",
        "/apply/multiply?x=1&y=1",
        headers={"Idempotency-Key": key.encode().decode("latin-1")},
    )
    assert response.status == 400
    assert answer["status"] == "failure"
    assert answer["reason"].startswith("invalid Idempotency-Key")


# -- the result store -------------------------------------------------------------------


def test_results_max_evicts_the_oldest(
    serve: Callable[..., tuple[TaskApp, Client]], probe: Probe
) -> None:
    _, client = serve(results_max=3)
    ids = [client.apply("multiply", f"x={n}&y=10") for n in range(4)]
    for task_id in ids[1:]:
        assert client.wait(task_id)["status"] == "SUCCESS"
    assert client.status(ids[0]) == {"id": ids[0], "status": "PENDING", "result": None}
    assert client.done(ids[0]) is False
    assert [client.status(i)["result"] for i in ids[1:]] == [10, 20, 30]


def test_an_evicted_running_task_still_runs(
    serve: Callable[..., tuple[TaskApp, Client]], probe: Probe
) -> None:
    app, client = serve(results_max=1)
    slow = client.apply("wait")
    assert probe.started.wait(TIMEOUT)
    fast = client.apply("multiply", "x=2&y=3")
    assert client.wait(fast)["result"] == 6
    assert client.status(slow)["status"] == "PENDING"  # evicted: unknown
    probe.release.set()
    app.close()  # the app's own Dispatcher waits for its calls
    assert probe.calls["wait"] == 1


def test_results_expire_after_results_max_age(
    serve: Callable[..., tuple[TaskApp, Client]], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = serve(results_max_age=60.0)
    now = [1000.0]
    assert app._gateway is not None
    monkeypatch.setattr(app._gateway.store, "_clock", lambda: now[0])
    task_id = client.apply("multiply", "x=6&y=7")
    assert client.wait(task_id)["result"] == 42
    now[0] += 59.0
    assert client.status(task_id)["status"] == "SUCCESS"
    now[0] += 1.0
    assert client.status(task_id) == {"id": task_id, "status": "PENDING", "result": None}
    assert client.done(task_id) is False


def test_store_bounds_by_count_oldest_first() -> None:
    store: ResultStore[int] = ResultStore(2, 10.0, clock=lambda: 0.0)
    assert store.add("a", 1)
    assert store.add("b", 2)
    assert not store.add("a", 99)  # present: not replaced, not refreshed
    assert store.add("c", 3)
    assert (store.get("a"), store.get("b"), store.get("c")) == (None, 2, 3)
    assert len(store) == 2


def test_store_expires_lazily_by_age() -> None:
    now = [0.0]
    store: ResultStore[str] = ResultStore(10, 5.0, clock=lambda: now[0])
    store.add("old", "x")
    now[0] = 3.0
    store.add("new", "y")
    now[0] = 4.999
    assert store.get("old") == "x"
    now[0] = 5.0
    assert store.get("old") is None
    assert store.get("new") == "y"
    now[0] = 8.0
    assert len(store) == 0
    assert store.add("old", "again")  # an expired id can be used anew


def test_store_replace_keeps_age_and_discard_removes() -> None:
    now = [0.0]
    store: ResultStore[int] = ResultStore(10, 5.0, clock=lambda: now[0])
    store.add("a", 1)
    now[0] = 4.0
    store.replace("a", 2)
    store.replace("gone", 3)  # absent: nothing happens
    assert store.get("a") == 2
    assert store.get("gone") is None
    now[0] = 5.0
    assert store.get("a") is None
    store.add("b", 1)
    store.discard("b")
    store.discard("b")
    assert store.get("b") is None


# -- the store's bound in bytes ---------------------------------------------------------


def post_form(client: Client, path: str, form: bytes, **headers: str) -> tuple[Any, Any]:
    return client.request("POST", path, form, {"Content-Type": FORM, **headers})


def test_a_failed_call_keeps_its_status_not_its_request(
    serve: Callable[..., tuple[TaskApp, Client]],
) -> None:
    app, client = serve()
    assert app._gateway is not None
    # made once: the Dispatcher, its pool and threads, the source lines tracebacks show
    client.wait(client.apply("multiply", "x=1&y=1"))
    client.wait(client.apply("multiply", "x=a&y=1"))
    form = b"y=1&x=" + b"a" * 1_000_000  # a 1 MB form the task refuses
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        ids = []
        for _ in range(10):
            response, answer = post_form(client, "/apply/multiply", form)
            assert response.status == 200
            ids.append(answer["task_id"])
        for task_id in ids:
            task = client.wait(task_id)
            assert task["status"] == "FAILURE"
            assert task["result"].startswith("argument 'x': invalid int 'aaa")
        del response, answer, task
        # no gc.collect(): what a finished call leaves must go by reference counting
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # each failed call held its 1 MB request (twice over) before; now only its status
    assert retained < 1_000_000, f"{retained} bytes retained by 10 failed applies"
    assert len(app._gateway.store) == 12
    assert 12 * 500 < app._gateway.store.nbytes < 12 * 10_000  # the status answers


def test_a_full_store_refuses_applies_with_503_and_retry_after(
    serve: Callable[..., tuple[TaskApp, Client]], probe: Probe
) -> None:
    _, client = serve(results_max_bytes=300_000)
    payload = b"payload=" + b"p" * 120_000
    held = []
    for key in ("first", "second"):  # two running calls hold 2 x 120 kB of arguments
        response, answer = post_form(client, "/apply/hold", payload, **{"Idempotency-Key": key})
        assert (response.status, answer["task_id"]) == (200, key)
        held.append(key)
    response, answer = post_form(client, "/apply/hold", payload)
    assert response.status == 503
    # a running call frees its arguments when it finishes: try again soon
    assert response.headers["Retry-After"] == "1"
    assert answer == {
        "status": "failure",
        "reason": "the gateway's result store is full (results_max_bytes); try again later",
    }
    # a retry of a stored apply is answered as before; a small apply still fits
    response, answer = post_form(client, "/apply/hold", payload, **{"Idempotency-Key": "first"})
    assert (response.status, answer["task_id"]) == (200, "first")
    assert client.wait(client.apply("multiply", "x=6&y=7"))["result"] == 42
    probe.release.set()
    for key in held:
        assert client.wait(key)["result"] == 120_000
    assert probe.calls["hold"] == 2  # the refused apply never ran
    # finished, the two calls keep only their status: room again
    response, answer = post_form(client, "/apply/hold", payload)
    assert response.status == 200
    assert client.wait(answer["task_id"])["result"] == 120_000


def test_expiring_results_free_their_room(
    serve: Callable[..., tuple[TaskApp, Client]], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = serve(results_max_bytes=21_000, results_max_age=60.0)
    assert app._gateway is not None
    now = [1000.0]
    monkeypatch.setattr(app._gateway.store, "_clock", lambda: now[0])
    text = "d" * 6000
    ids = []
    for _ in range(3):  # finished results of about 6 kB each
        ids.append(client.apply("describe", f"text={text}"))
        assert client.wait(ids[-1])["result"] == {"text": text}
    now[0] += 10.0
    response, _ = client.request("GET", f"/apply/describe?text={text}")
    assert response.status == 503
    assert response.headers["Retry-After"] == "50"  # the oldest result expires in 50 s
    now[0] += 49.0
    assert client.request("GET", f"/apply/describe?text={text}")[0].status == 503
    now[0] += 1.0
    assert client.status(ids[0])["status"] == "PENDING"  # expired, and its room is free
    assert client.wait(client.apply("describe", f"text={text}"))["result"] == {"text": text}


def test_an_apply_larger_than_the_whole_store_is_a_413(
    serve: Callable[..., tuple[TaskApp, Client]], probe: Probe
) -> None:
    _, client = serve(results_max_bytes=1000)
    response, answer = client.request("GET", "/apply/multiply?y=1&x=" + "7" * 2000)
    assert response.status == 413
    assert answer["reason"].startswith("the arguments (")
    assert "exceed results_max_bytes (1000)" in answer["reason"]
    assert probe.calls["multiply"] == 0


def test_store_counts_bytes_and_refuses_what_does_not_fit() -> None:
    now = [0.0]
    store: ResultStore[str] = ResultStore(10, 60.0, max_bytes=100, clock=lambda: now[0])
    assert store.add("a", "running a", size=40)
    now[0] = 5.0
    assert store.add("b", "running b", size=40)
    assert store.nbytes == 80
    with pytest.raises(StoreFull) as full:
        store.add("c", "c", size=30)
    assert full.value.retry_after == 1  # a running entry may shrink any moment
    assert not store.add("a", "again", size=1000)  # present: answered, not refused
    assert store.settle("a", "running a", "done a", size=10)
    assert not store.settle("a", "running a", "stale", size=99)  # not the expected value
    assert (store.get("a"), store.nbytes) == ("done a", 50)
    assert store.settle("b", "running b", "done b", size=40)
    assert store.add("c", "c", size=40)
    assert store.settle("c", "c", "done c", size=40)
    with pytest.raises(StoreFull) as full:
        store.add("d", "d", size=30)  # only expiry makes room now: "b" expires at 65
    assert full.value.retry_after == 60
    with pytest.raises(StoreFull) as full:
        store.add("huge", "h", size=101)
    assert full.value.retry_after is None  # it never fits
    store.discard("c")
    assert store.nbytes == 50
    now[0] = 60.0  # "a" expires
    assert store.add("d", "d", size=50)
    assert (store.get("a"), store.nbytes) == (None, 90)


def test_store_eviction_by_count_frees_bytes() -> None:
    store: ResultStore[int] = ResultStore(2, 60.0, max_bytes=100, clock=lambda: 0.0)
    store.add("a", 1, size=60)
    store.add("b", 2, size=30)
    assert store.add("c", 3, size=60)  # evicting "a" for the count makes room for it
    assert (store.get("a"), store.nbytes) == (None, 90)
    with pytest.raises(StoreFull):
        store.add("d", 4, size=80)  # evicting "b" would not make room: nothing is evicted
    assert (store.get("b"), store.nbytes) == (2, 90)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"results_max": 0}, "results_max must be"),
        ({"results_max": True}, "results_max must be"),
        ({"results_max_age": 0}, "results_max_age must be"),
        ({"results_max_bytes": 0}, "results_max_bytes must be"),
        ({"results_max_bytes": 1.5}, "results_max_bytes must be"),
        ({"gateway": False, "results_max_bytes": 5}, "need gateway=True"),
        ({"callback_url": "ftp://host"}, "callback_url must be an http"),
        ({"callback_url": "http://host/?q=1"}, "callback_url must be an http"),
        ({"gateway": False, "results_max": 5}, "need gateway=True"),
        ({"gateway": False, "callback_url": "http://host"}, "need gateway=True"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    options.setdefault("gateway", True)
    with pytest.raises(ValueError, match=message):
        TaskApp(**options)


# -- where the calls go -----------------------------------------------------------------


def test_a_forged_host_header_is_not_the_callback(client: Client) -> None:
    served = client.server.stats.requests_served
    task_id = client.apply("multiply", "x=6&y=7", Host="evil.invalid")
    assert client.wait(task_id) == {"id": task_id, "status": "SUCCESS", "result": 42}
    # apply + the gateway's own call of /multiply + at least one status poll, all here
    assert client.server.stats.requests_served >= served + 3


def test_explicit_callback_url_wins(
    serve: Callable[..., tuple[TaskApp, Client]], probe: Probe
) -> None:
    other = TaskApp()

    @other.task
    def multiply(x: int, y: int) -> str:
        return f"the other server: {x * y}"

    with other.server(port=0) as elsewhere:
        _, client = serve(callback_url=elsewhere.url + "/")
        task = client.wait(client.apply("multiply", "x=6&y=7"))
        assert task["result"] == "the other server: 42"
        assert elsewhere.stats.requests_served == 1
    assert probe.calls["multiply"] == 0


def environ(**values: str) -> dict[str, Any]:
    base = {"wsgi.url_scheme": "http", "SERVER_NAME": "10.1.2.3", "SERVER_PORT": "8000"}
    return {**base, "HTTP_HOST": "evil.invalid:666", **values}


def wsgi_origin(**values: str) -> Origin:
    return wsgi_request(environ(**values)).origin


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, "http://10.1.2.3:8000"),
        ({"SERVER_NAME": "0.0.0.0"}, "http://127.0.0.1:8000"),
        ({"SERVER_NAME": "::"}, "http://[::1]:8000"),
        ({"SERVER_NAME": "::1", "SERVER_PORT": "81"}, "http://[::1]:81"),
        ({"SCRIPT_NAME": "/tasks/"}, "http://10.1.2.3:8000/tasks"),
        ({"SCRIPT_NAME": "/t\u00c3\u00a9"}, "http://10.1.2.3:8000/t%C3%A9"),  # UTF-8 as latin-1
        ({"wsgi.url_scheme": "https"}, "https://10.1.2.3:8000"),
    ],
)
def test_callback_base_comes_from_the_server_not_the_host_header(
    values: dict[str, str], expected: str
) -> None:
    gateway = Gateway(dispatcher=None, callback_url=None, results_max=1, results_max_age=1.0)
    assert gateway.callback_base(wsgi_origin(**values)) == expected
    given = Gateway(
        dispatcher=None, callback_url="http://tasks:9/x/", results_max=1, results_max_age=1.0
    )
    assert given.callback_base(wsgi_origin(**values)) == "http://tasks:9/x"


def scope(**values: Any) -> dict[str, Any]:
    base = {"type": "http", "scheme": "http", "server": ("10.1.2.3", 8000), "path": "/apply/x"}
    return {**base, "headers": [(b"host", b"evil.invalid:666")], **values}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, "http://10.1.2.3:8000"),
        ({"server": ("0.0.0.0", 81)}, "http://127.0.0.1:81"),
        ({"server": ("::", 8000)}, "http://[::1]:8000"),
        ({"root_path": "/tasks/", "path": "/tasks/apply/x"}, "http://10.1.2.3:8000/tasks"),
        ({"root_path": "/t\u00e9"}, "http://10.1.2.3:8000/t%C3%A9"),  # ASGI: decoded text
        ({"scheme": "https"}, "https://10.1.2.3:8000"),
    ],
)
def test_callback_base_of_an_asgi_request_comes_from_its_server(
    values: dict[str, Any], expected: str
) -> None:
    gateway = Gateway(dispatcher=None, callback_url=None, results_max=1, results_max_age=1.0)
    assert gateway.callback_base(asgi_request(scope(**values)).origin) == expected


@pytest.mark.parametrize("server", [None, ("/run/tasks.sock", None)])
def test_callback_base_of_an_asgi_request_without_a_port_needs_callback_url(
    server: Any,
) -> None:
    from dispatchkit.server._refused import Refused

    gateway = Gateway(dispatcher=None, callback_url=None, results_max=1, results_max_age=1.0)
    with pytest.raises(Refused, match="pass callback_url="):
        gateway.callback_base(asgi_request(scope(server=server)).origin)


@pytest.mark.parametrize("name", ["", "evil.invalid/x?", "a b"])
def test_callback_base_refuses_a_bad_server_name(name: str) -> None:
    from dispatchkit.server._refused import Refused

    gateway = Gateway(dispatcher=None, callback_url=None, results_max=1, results_max_age=1.0)
    with pytest.raises(Refused, match="pass callback_url="):
        gateway.callback_base(wsgi_origin(SERVER_NAME=name))


def test_routes() -> None:
    assert route("/apply/multiply") == ("apply", "multiply")
    assert route("/apply/status") == ("apply", "status")  # applying a task named "status"
    assert route("/abc/status") == ("status", "abc")
    assert route("/abc/done") == ("done", "abc")
    for path in ("/apply", "/multiply", "/", "", "//status", "/a/b/status", "/abc/other"):
        assert route(path) is None, path


# -- the dispatcher ---------------------------------------------------------------------


class Recorder:
    """Sees every call of the Dispatcher it is registered on."""

    name = "recorder"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []
        self.outcomes: list[Outcome] = []

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self.requests.append((request.method, request.url, request.headers["Idempotency-Key"]))

    @hookimpl
    def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


def test_a_given_dispatcher_runs_the_calls_and_is_not_closed(
    serve: Callable[..., tuple[TaskApp, Client]],
) -> None:
    recorder = Recorder()
    with Dispatcher(plugins=[recorder], timeout=5) as dispatcher:
        app, client = serve(dispatcher=dispatcher)
        task_id = client.apply("multiply", "x=6&y=7")
        assert client.wait(task_id)["result"] == 42
        base = client.server.url
        assert recorder.requests == [("GET", f"{base}/multiply?x=6&y=7", task_id)]
        _, answer = client.request(
            "POST", "/apply/total", body='{"xs": [2]}', headers={"Content-Type": "application/json"}
        )
        assert client.wait(answer["task_id"])["result"] == 2
        assert recorder.requests[1] == ("POST", f"{base}/total", answer["task_id"])
        assert [o.retval for o in recorder.outcomes] == [42, 2]
        app.close()
        app.close()
        assert dispatcher.call(f"{base}/multiply", x=2, y=3) == 6  # still open
        response, answer = client.request("GET", "/apply/multiply?x=1&y=1")
        assert response.status == 503
        assert answer == {"status": "failure", "reason": "the gateway is closed"}


def test_a_closed_given_dispatcher_is_a_503(serve: Callable[..., tuple[TaskApp, Client]]) -> None:
    dispatcher = Dispatcher()
    dispatcher.close()
    _, client = serve(dispatcher=dispatcher)
    response, answer = client.request("GET", "/apply/multiply?x=1&y=1")
    assert response.status == 503
    assert answer["reason"] == "cannot apply: this Dispatcher is closed"
    response, answer = client.request(
        "GET", "/apply/multiply?x=1&y=1", headers={"Idempotency-Key": "k1"}
    )
    assert response.status == 503
    assert client.status("k1")["status"] == "PENDING"  # nothing was stored for a retry to find


def test_close_closes_the_apps_own_dispatcher(
    serve: Callable[..., tuple[TaskApp, Client]],
) -> None:
    before = set(threading.enumerate())
    app, client = serve()
    assert client.wait(client.apply("multiply", "x=6&y=7"))["result"] == 42
    workers = [t for t in set(threading.enumerate()) - before if t.name.startswith("dispatchkit_")]
    assert workers, "the app's Dispatcher runs calls on its executor threads"
    app.close()
    assert not any(t.is_alive() for t in workers)
    app.close()  # idempotent
    response, answer = client.request("GET", "/apply/multiply?x=1&y=1")
    assert (response.status, answer["reason"]) == (503, "the gateway is closed")
    assert client.status("anything")["status"] == "PENDING"  # reading still works


def test_close_without_the_gateway_is_harmless() -> None:
    app = TaskApp()
    app.close()
    app.close()


def test_server_stop_does_not_close_the_app(
    serve: Callable[..., tuple[TaskApp, Client]],
) -> None:
    app, client = serve()
    client.close()
    client.server.stop()
    with app.server(port=0) as again:
        restarted = Client(again)
        try:
            assert restarted.wait(restarted.apply("multiply", "x=2&y=21"))["result"] == 42
        finally:
            restarted.close()


SERVE_SCRIPT = textwrap.dedent(
    """
    import io, json
    from dispatchkit.server import TaskApp

    app = TaskApp(gateway=True)

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    app.serve(port=0)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/apply/multiply",
               "QUERY_STRING": "x=1&y=1", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO()}
    answer = app(environ, lambda status, headers: None)
    print(json.loads(answer[0])["reason"], flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery differs on Windows")
def test_serve_closes_the_app_when_it_stops() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT], stdout=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            port = int(line.rsplit(":", 1)[1].rstrip("/\n"))
            client = Client.to(port)
            try:
                assert client.wait(client.apply("multiply", "x=6&y=7"))["result"] == 42
            finally:
                client.close()
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(TIMEOUT)
    assert process.returncode == 0
    assert out == "the gateway is closed\n"


# -- a client that is not Python --------------------------------------------------------


def run_node_client(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    require(NODE is not None, "node is not installed")
    assert NODE is not None
    return subprocess.run(
        [NODE, str(CLIENT_SCRIPT), url, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_node_client_applies_and_polls(client: Client) -> None:
    done = run_node_client(client.server.url, "multiply", "x=6", "y=7")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer == {"task_id": answer["task_id"], "status": "SUCCESS", "result": 42}
    assert client.status(answer["task_id"])["result"] == 42


def test_node_client_reports_a_failure(client: Client) -> None:
    done = run_node_client(client.server.url, "multiply", "x=six", "y=7")
    assert done.returncode == 1
    answer = json.loads(done.stdout)
    assert answer["status"] == "FAILURE"
    assert answer["result"] == "argument 'x': invalid int 'six'"
    assert "FAILURE" in done.stderr


def test_node_client_reports_an_unknown_task(client: Client) -> None:
    done = run_node_client(client.server.url, "nope", "x=1")
    assert done.returncode == 1
    assert "unknown task: 'nope'" in done.stderr
    assert done.stdout == ""


def test_forwarded_form_values_are_plain_strings_and_lists() -> None:
    from dispatchkit.server._arguments import FormValues
    from dispatchkit.server._gateway import forwarded

    received: dict[str, object] = {"a": FormValues(["1"]), "b": FormValues(["1", "2"]), "c": 3}
    plain = forwarded(received)
    assert plain == {"a": "1", "b": ["1", "2"], "c": 3}
    assert type(plain["b"]) is list
