"""The built-in retry policy (docs/protocol.md, Retries), against the Node.js peer."""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any

import pytest

from dispatchkit import Dispatcher, HTTPStatusError, RemoteExecuteError
from dispatchkit.builtin.retry import is_retryable, parse_retry_after
from support.probes import Attempts


@pytest.fixture
def attempts() -> Attempts:
    return Attempts()


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("code", [429, 502, 503, 504])
def test_idempotent_methods_retry_transient_statuses(
    make_dispatcher: Any, peer: str, attempts: Attempts, method: str, code: int
) -> None:
    d = make_dispatcher(plugins=[attempts])
    assert d.call(f"{peer}/flaky", method, fail=1, code=code) == 2
    assert attempts.numbers == [1, 2]


def test_post_is_not_retried_on_503(make_dispatcher: Any, peer: str, attempts: Attempts) -> None:
    d = make_dispatcher(plugins=[attempts])
    with pytest.raises(HTTPStatusError) as info:
        d.call(f"{peer}/flaky", "POST", fail=1, code=503)
    assert info.value.status == 503
    assert attempts.numbers == [1]


@pytest.mark.parametrize("code", [400, 404, 500])
def test_other_statuses_are_not_retried(
    make_dispatcher: Any, peer: str, attempts: Attempts, code: int
) -> None:
    d = make_dispatcher(plugins=[attempts])
    with pytest.raises(HTTPStatusError):
        d.call(f"{peer}/flaky", fail=1, code=code)
    assert attempts.numbers == [1]


def test_task_failure_is_not_retried(make_dispatcher: Any, peer: str, attempts: Attempts) -> None:
    d = make_dispatcher(plugins=[attempts])
    with pytest.raises(RemoteExecuteError):
        d.call(f"{peer}/fail500")
    assert attempts.numbers == [1]


def test_one_idempotency_key_across_retries(
    make_dispatcher: Any, peer: str, attempts: Attempts
) -> None:
    d = make_dispatcher(plugins=[attempts], retry_attempts=5)
    d.call(f"{peer}/seen/reset")
    attempts.seen.clear()
    assert d.apply(f"{peer}/flaky", "GET", {"fail": 3}, task_id="job-42") == 4
    assert {key for _, key, _ in attempts.seen} == {"job-42"}
    assert d.call(f"{peer}/seen") == {"job-42": 4}


def test_attempts_are_bounded(make_dispatcher: Any, peer: str, attempts: Attempts) -> None:
    d = make_dispatcher(plugins=[attempts], retry_attempts=3)
    with pytest.raises(HTTPStatusError):
        d.call(f"{peer}/flaky", fail=10)
    assert attempts.numbers == [1, 2, 3]


def test_one_attempt_turns_retrying_off(
    make_dispatcher: Any, peer: str, attempts: Attempts
) -> None:
    d = make_dispatcher(plugins=[attempts], retry_attempts=1)
    with pytest.raises(HTTPStatusError):
        d.call(f"{peer}/flaky", fail=1)
    assert attempts.numbers == [1]


def test_retry_after_seconds_is_honoured(
    make_dispatcher: Any, peer: str, attempts: Attempts
) -> None:
    d = make_dispatcher(plugins=[attempts])
    assert d.call(f"{peer}/flaky", fail=1, code=503, retry_after=1) == 2
    assert attempts.gap(1) >= 0.9  # a lower bound only: the wait asked for was taken


def test_retry_after_http_date_is_honoured(
    make_dispatcher: Any, peer: str, attempts: Attempts
) -> None:
    d = make_dispatcher(plugins=[attempts])
    when = formatdate(time.time() + 2, usegmt=True)  # one second resolution: waits 1-2 s
    assert d.call(f"{peer}/flaky", fail=1, code=429, retry_after=when) == 2
    assert attempts.gap(1) >= 0.9


def test_absurd_retry_after_is_capped(make_dispatcher: Any, peer: str, attempts: Attempts) -> None:
    d = make_dispatcher(plugins=[attempts], retry_after_cap=0.2)
    assert d.call(f"{peer}/flaky", fail=1, code=503, retry_after=10**9) == 2
    assert attempts.gap(1) >= 0.15


def test_retry_after_beyond_the_time_budget_stops_retrying(
    make_dispatcher: Any, peer: str, attempts: Attempts
) -> None:
    d = make_dispatcher(plugins=[attempts], retry_after_cap=60, retry_max_time=1)
    with pytest.raises(HTTPStatusError) as info:
        d.call(f"{peer}/flaky", fail=1, code=503, retry_after=30)
    assert info.value.status == 503
    assert attempts.numbers == [1]  # a 30 s wait would overrun the 1 s budget: no retry


def test_garbage_retry_after_falls_back_to_backoff(
    make_dispatcher: Any, peer: str, attempts: Attempts
) -> None:
    d = make_dispatcher(plugins=[attempts])
    assert d.call(f"{peer}/flaky", fail=2, code=503, retry_after="soon-ish") == 3


def test_disabling_the_builtin_policy(peer: str, attempts: Attempts) -> None:
    with Dispatcher(disable=["retry"], plugins=[attempts]) as d, pytest.raises(HTTPStatusError):
        d.call(f"{peer}/flaky", fail=1)
    assert attempts.numbers == [1]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("", None),
        (None, None),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00", None),  # no zone: ambiguous, ignored
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_foreign_exceptions_are_not_retried() -> None:
    assert not is_retryable(KeyError("x"))
