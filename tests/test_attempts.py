"""Every attempt recorded: ``Attempt`` values, ``execute(..., attempts=)``, the hook.

Against real servers on loopback: the Node.js peer (``/flaky`` answers 503
until the n-th request with one Idempotency-Key, ``/fail`` a 200 failure
envelope) and the scripted socket server. Both drivers are held to the same
records; the tests assert on what was recorded, never on how fast.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import timezone
from typing import Any

import pytest

from dispatchkit import (
    AsyncDispatcher,
    AsyncResult,
    Attempt,
    Call,
    ConnectError,
    Dispatcher,
    DispatchError,
    HTTPStatusError,
    InvalidResponseError,
    RemoteExecuteError,
    Request,
    UsageError,
    _pipeline,
    hookimpl,
)
from support.drivers import DRIVERS, make_client
from support.probes import free_port
from support.scripted_server import (
    ScriptedServer,
    per_connection,
    read,
    respond,
    response,
    serve,
    wait,
)

WORKER = f"{socket.gethostname()}:{os.getpid()}"
SETTINGS: dict[str, Any] = {"timeout": 5, "retry_backoff": 0.01}


class Seen:
    """Keeps what ``dispatchkit_attempt_done`` was given, as (request.attempt, record)."""

    name = "seen"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[int, Attempt]] = []

    @hookimpl
    def dispatchkit_attempt_done(self, request: Request, attempt: Attempt) -> None:
        with self.lock:
            self.calls.append((request.attempt, attempt))

    @property
    def records(self) -> list[Attempt]:
        return [attempt for _, attempt in self.calls]


class Broken:
    name = "broken"

    @hookimpl
    def dispatchkit_attempt_done(self, request: Request, attempt: Attempt) -> None:
        raise RuntimeError("the metrics backend is down")


@pytest.fixture
def d() -> Iterator[Dispatcher]:
    with Dispatcher(**SETTINGS) as dispatcher:
        yield dispatcher


def execute(driver: str, call: Call, attempts: list[Attempt], **settings: Any) -> Any:
    """``execute(call, attempts=attempts)`` on a new dispatcher of ``driver``."""
    if driver == "sync":
        with Dispatcher(**SETTINGS, **settings) as d:
            return d.execute(call, attempts=attempts)

    async def main() -> Any:
        async with AsyncDispatcher(**SETTINGS, **settings) as d:
            return await d.execute(call, attempts=attempts)

    return asyncio.run(main())


def shape(attempt: Attempt) -> tuple[int, str, int | None, str | None]:
    """What both drivers must record alike (not when, nor the task id in the message)."""
    return attempt.number, attempt.outcome, attempt.status, attempt.body


# -- what a record holds -------------------------------------------------------------------


def test_a_retried_call_records_each_attempt(d: Dispatcher, peer: str) -> None:
    records: list[Attempt] = []
    assert d.execute(Call(f"{peer}/flaky", kwargs={"fail": 2}), attempts=records) == 3
    assert [a.number for a in records] == [1, 2, 3]
    assert [a.outcome for a in records] == ["503", "503", "200"]
    assert [a.status for a in records] == [503, 503, 200]
    assert [a.body for a in records][:2] == ["try again", "try again"]
    first, _, last = records
    assert first.error is not None
    assert first.error.startswith("HTTP 503: 'try again'")
    assert last.error is None
    assert last.body is not None
    assert '"retval":3' in last.body.replace(" ", "")
    assert all(a.duration >= 0 for a in records)
    assert records[0].started < records[1].started < records[2].started
    assert {a.worker for a in records} == {WORKER}
    assert all(a.started_at.tzinfo is timezone.utc for a in records)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_connect_error_is_recorded_by_its_type(driver: str) -> None:
    records: list[Attempt] = []
    url = f"http://127.0.0.1:{free_port()}/task?token=hunter2"
    call = Call(url, headers={"Authorization": "Bearer hunter2"})
    with pytest.raises(ConnectError):
        execute(driver, call, records, retry_attempts=2)
    assert [a.outcome for a in records] == ["ConnectError", "ConnectError"]
    assert [(a.status, a.body) for a in records] == [(None, None), (None, None)]
    for attempt in records:
        assert attempt.error is not None
        assert "127.0.0.1" in attempt.error
        assert "hunter2" not in json.dumps(attempt.to_dict())  # URL masked, headers never


def test_a_failure_envelope_is_an_answer_with_an_error(d: Dispatcher, peer: str) -> None:
    records: list[Attempt] = []
    with pytest.raises(RemoteExecuteError, match="disk full"):
        d.execute(Call(f"{peer}/fail", kwargs={"reason": "disk full"}), attempts=records)
    [attempt] = records
    assert (attempt.outcome, attempt.status) == ("200", 200)
    assert attempt.error is not None
    assert attempt.error.startswith("disk full")
    assert attempt.body is not None
    assert "failure" in attempt.body


def test_an_unreadable_2xx_answer_is_recorded_with_its_error(d: Dispatcher, peer: str) -> None:
    records: list[Attempt] = []
    with pytest.raises(InvalidResponseError):
        d.execute(Call(f"{peer}/invalid/json"), attempts=records)
    [attempt] = records
    assert (attempt.outcome, attempt.body) == ("200", "{not json")
    assert attempt.error is not None


def test_the_body_is_cut_at_1024_bytes(d: Dispatcher) -> None:
    body = b"a" + "é".encode() * 1500  # byte 1024 falls inside an "é"
    answer = response(503, body, content_type="text/plain")
    with ScriptedServer([serve(lambda request: answer)]) as server:
        records: list[Attempt] = []
        with pytest.raises(HTTPStatusError):
            d.execute(Call(f"{server.url}/t"), attempts=records)
    assert [a.outcome for a in records] == ["503"] * 3
    assert {a.body for a in records} == {"a" + "é" * 511 + "\ufffd"}


def test_a_refusing_prepare_hook_fails_a_recorded_attempt(peer: str) -> None:
    class Refuse:
        @hookimpl
        def dispatchkit_prepare_request(self, request: Request) -> None:
            raise DispatchError("no credentials")

    records: list[Attempt] = []
    with Dispatcher(**SETTINGS, plugins=[Refuse()]) as d, pytest.raises(DispatchError):
        d.execute(Call(f"{peer}/multiply", kwargs={"x": 1, "y": 2}), attempts=records)
    [attempt] = records
    assert (attempt.number, attempt.outcome, attempt.status) == (1, "DispatchError", None)
    assert attempt.error is not None
    assert attempt.error.startswith("no credentials")


# -- the hook, in both drivers -----------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_hook_sees_every_attempt(driver: str, peer: str) -> None:
    seen = Seen()
    client = make_client(driver, plugins=[seen], **SETTINGS)
    try:
        assert client.apply(f"{peer}/flaky", "GET", {"fail": 1}) == 2
    finally:
        client.close()
    assert [(n, a.number, a.outcome) for n, a in seen.calls] == [(1, 1, "503"), (2, 2, "200")]


def test_both_drivers_record_alike_in_the_list_and_the_hook(peer: str) -> None:
    flaky = Call(f"{peer}/flaky", kwargs={"fail": 2})
    sync_seen, async_seen = Seen(), Seen()
    sync_records: list[Attempt] = []
    async_records: list[Attempt] = []
    assert execute("sync", flaky, sync_records, plugins=[sync_seen]) == 3
    assert execute("async", flaky, async_records, plugins=[async_seen]) == 3
    assert sync_seen.records == sync_records
    assert async_seen.records == async_records
    assert [shape(a) for a in async_records] == [shape(a) for a in sync_records]
    assert {a.worker for a in sync_records + async_records} == {WORKER}


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_raising_hook_is_logged_and_the_call_goes_on(
    driver: str, peer: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(driver, plugins=[Broken()], **SETTINGS)
    try:
        with caplog.at_level(logging.ERROR, logger="dispatchkit"):
            assert client.call(f"{peer}/multiply", x=6, y=7) == 42
    finally:
        client.close()
    assert "a dispatchkit_attempt_done hook failed" in caplog.text
    assert "the metrics backend is down" in caplog.text


def test_nothing_is_built_when_nothing_records(
    d: Dispatcher, peer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_record(**fields: Any) -> Attempt:
        raise AssertionError("an Attempt was built with no list and no hook")

    monkeypatch.setattr(_pipeline, "Attempt", no_record)
    assert d.call(f"{peer}/flaky", fail=1) == 2
    assert d.execute(Call(f"{peer}/multiply", kwargs={"x": 2, "y": 3})) == 6


# -- submit(): AsyncResult.attempts ---------------------------------------------------------


def test_async_result_attempts_grow_while_the_call_runs(d: Dispatcher) -> None:
    go_on = threading.Event()
    script = per_connection([read(), respond(503, b"busy")], then=[read(), wait(go_on), respond()])
    with ScriptedServer(script) as server:
        result = d.submit(f"{server.url}/t")
        assert isinstance(result, AsyncResult)  # the built-in thread executor's
        assert server.wait_until(lambda s: len(s.requests) >= 2, timeout=10)
        assert [a.outcome for a in result.attempts] == ["503"]
        assert not result.ready()
        go_on.set()
        assert result.get(timeout=10) == "ok"
    assert isinstance(result.attempts, tuple)
    assert [(a.number, a.outcome, a.error) for a in result.attempts][1] == (2, "200", None)


def test_async_result_attempts_of_a_failed_call(d: Dispatcher, peer: str) -> None:
    result = d.submit(f"{peer}/status/502")
    assert isinstance(result, AsyncResult)
    assert isinstance(result.get(timeout=10, propagate=False), HTTPStatusError)
    assert [a.outcome for a in result.attempts] == ["502", "502", "502"]
    assert [a.number for a in result.attempts] == [1, 2, 3]


# -- to_dict / from_dict ---------------------------------------------------------------------


def test_records_round_trip_through_json(d: Dispatcher, peer: str) -> None:
    records: list[Attempt] = []
    d.execute(Call(f"{peer}/flaky", kwargs={"fail": 1}), attempts=records)
    for attempt in records:
        data = json.loads(json.dumps(attempt.to_dict()))
        assert data["started"].endswith(("Z", "+00:00"))
        assert Attempt.from_dict(data) == attempt
        zulu = {**data, "started": data["started"].replace("+00:00", "Z")}
        assert Attempt.from_dict(zulu) == attempt


GOOD = Attempt(1, 1_700_000_000.25, 0.5, "503", 503, "HTTP 503", "busy", "host:1")

BAD: dict[str, object] = {
    "not a mapping": [1, 2],
    "a key missing": {k: v for k, v in GOOD.to_dict().items() if k != "outcome"},
    "number as text": {**GOOD.to_dict(), "number": "1"},
    "number as bool": {**GOOD.to_dict(), "number": True},
    "number 0": {**GOOD.to_dict(), "number": 0},
    "negative duration": {**GOOD.to_dict(), "duration": -1.0},
    "NaN duration": {**GOOD.to_dict(), "duration": float("nan")},
    "started not a time": {**GOOD.to_dict(), "started": "yesterday"},
    "started without offset": {**GOOD.to_dict(), "started": "2023-11-14T22:13:20"},
    "started as a number": {**GOOD.to_dict(), "started": 1_700_000_000.25},
    "status as text": {**GOOD.to_dict(), "status": "503"},
    "worker None": {**GOOD.to_dict(), "worker": None},
    "duration past any float": {**GOOD.to_dict(), "duration": 10**400},
    "pool_wait past any float": {**GOOD.to_dict(), "pool_wait": 10**400},
    "started year 0 in UTC": {**GOOD.to_dict(), "started": "0001-01-01T00:00:00+14:00"},
    "started year 10000 in UTC": {**GOOD.to_dict(), "started": "9999-12-31T23:59:59-23:59"},
}


def test_from_dict_reads_what_to_dict_writes() -> None:
    assert Attempt.from_dict(GOOD.to_dict()) == GOOD
    assert Attempt.from_dict({**GOOD.to_dict(), "new_field": 1}) == GOOD
    success = replace(GOOD, outcome="200", status=200, error=None)
    assert Attempt.from_dict(success.to_dict()) == success


@pytest.mark.parametrize("case", sorted(BAD))
def test_from_dict_refuses_malformed_data(case: str) -> None:
    with pytest.raises(UsageError, match="attempt"):
        Attempt.from_dict(BAD[case])  # type: ignore[arg-type]


def test_the_worker_is_named_again_after_a_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _pipeline.worker() == WORKER
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # what a forked child sees
    assert _pipeline.worker() == f"{socket.gethostname()}:4242"
    monkeypatch.undo()
    assert _pipeline.worker() == WORKER
