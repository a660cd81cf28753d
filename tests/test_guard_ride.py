"""The endpoint guard's round trips riding on a worker's ledger writes (``RedisGuard.ride``).

A Celery worker asks the guard for a call's admission in the same pipeline as
the ledger's take, and sends the call's report with its end. These tests
drive the guard as the worker does, on real Redis (database 2, this module's
own), and check that it decides exactly as its own round trips would: the
same admission, the slot held until the report is carried, an admission asked
ahead and never used given back, a report never carried sent at the end, and
an open breaker seen ahead as it would be seen alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from dispatchkit_celery._guard import RedisGuard, queue_reports
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery.testing import REDIS_URL

from dispatchkit._endpoints import ADMITTED
from dispatchkit.builtin.endpoints import Breaker, EndpointPolicy
from support.celery_env import ledger_on, redis_db

URL = urlunsplit(urlsplit(REDIS_URL)._replace(path="/2"))

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with redis_db(URL) as found:
        yield found


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    with ledger_on(url) as opened:
        yield opened


@pytest.fixture
def guard(url: str) -> Iterator[RedisGuard]:
    prefix = f"test:ride:{uuid.uuid4().hex}:"
    opened = RedisGuard(url, EndpointPolicy(breaker=Breaker(failures=2)), lease=30, prefix=prefix)
    try:
        yield opened
    finally:
        opened.close()


def in_flight(guard: RedisGuard, origin: str) -> int:
    return {state.origin: state.in_flight for state in guard.states(time.time())}.get(origin, 0)


def ahead(ledger: Ledger, ride: Any) -> None:
    """What the worker does at its take: the admission in the ledger's pipeline."""
    (reply,) = ledger.batch.run(ride.queue_admission, raise_errors=False)
    ride.admitted(reply)


def carry_reports(ledger: Ledger, ride: Any) -> None:
    """What the worker does at its end: the reports in the ledger's pipeline."""
    reports = ride.take_reports()
    ledger.batch.run(lambda pipe: queue_reports(pipe, reports))


class Counting:
    """Counts the guard's own round trips."""

    def __init__(self, guard: RedisGuard) -> None:
        self.sent = 0
        original = guard.batch.run

        def run(*args: Any, **kwargs: Any) -> list[Any]:
            self.sent += 1
            return original(*args, **kwargs)

        guard.batch.run = run  # type: ignore[method-assign]


def test_an_admission_asked_ahead_is_the_guards_own_without_its_round_trips(
    guard: RedisGuard, ledger: Ledger
) -> None:
    origin, endpoint = "http://127.0.0.1:8001", "http://127.0.0.1:8001/hook"
    counting = Counting(guard)
    with guard.ride(endpoint) as ride:
        ahead(ledger, ride)
        assert guard.admit(origin, endpoint, time.time()) == ADMITTED
        assert in_flight(guard, origin) == 1  # the slot is held, as after an admission
        guard.report(origin, endpoint, "success", time.time())
        assert in_flight(guard, origin) == 1  # kept for the worker's next writes
        carry_reports(ledger, ride)
        assert in_flight(guard, origin) == 0
    assert counting.sent == 0  # neither the admission nor the report went alone


def test_an_admission_asked_ahead_and_never_used_gives_its_slot_back(
    guard: RedisGuard, ledger: Ledger
) -> None:
    """A duplicate message: the take said no, nobody asks the guard."""
    origin, endpoint = "http://127.0.0.1:8002", "http://127.0.0.1:8002/hook"
    with guard.ride(endpoint) as ride:
        ahead(ledger, ride)
        assert in_flight(guard, origin) == 1
    assert in_flight(guard, origin) == 0


def test_reports_never_carried_are_sent_when_the_ride_ends(
    guard: RedisGuard, ledger: Ledger
) -> None:
    """A call that waits for its next attempt ends without the pipeline that carries them."""
    origin, endpoint = "http://127.0.0.1:8003", "http://127.0.0.1:8003/hook"
    with guard.ride(endpoint) as ride:
        ahead(ledger, ride)
        assert guard.admit(origin, endpoint, time.time()) == ADMITTED
        guard.report(origin, endpoint, "failure", time.time())
        assert in_flight(guard, origin) == 1
    assert in_flight(guard, origin) == 0
    (state,) = [s for s in guard.states(time.time()) if s.origin == origin]
    assert state.failures == 1  # the report counted


def test_another_endpoint_than_the_one_asked_ahead_asks_the_guard_itself(
    guard: RedisGuard, ledger: Ledger
) -> None:
    origin = "http://127.0.0.1:8004"
    counting = Counting(guard)
    with guard.ride(origin + "/asked") as ride:
        ahead(ledger, ride)
        assert guard.admit(origin, origin + "/other", time.time()) == ADMITTED
        assert counting.sent >= 1  # its own admission
        assert in_flight(guard, origin) == 1  # the one asked ahead was given back
        carry_reports(ledger, ride)
    guard.report(origin, origin + "/other", "success", time.time())
    assert in_flight(guard, origin) == 0


def test_an_open_breaker_is_seen_ahead_as_alone(guard: RedisGuard, ledger: Ledger) -> None:
    origin, endpoint = "http://127.0.0.1:8005", "http://127.0.0.1:8005/hook"
    for _ in range(2):  # two failures in a row open it (Breaker(failures=2))
        assert guard.admit(origin, endpoint, time.time()) == ADMITTED
        guard.report(origin, endpoint, "failure", time.time())
    alone = guard.admit(origin, endpoint, time.time())
    with guard.ride(endpoint) as ride:
        ahead(ledger, ride)
        riding = guard.admit(origin, endpoint, time.time())
    assert alone.verdict == riding.verdict == "open"
    assert riding.retry_at == pytest.approx(alone.retry_at, abs=1.0)
    assert in_flight(guard, origin) == 0


def test_flush_sends_the_kept_reports_at_once(guard: RedisGuard, ledger: Ledger) -> None:
    """A call that waits for its next attempt reports before its wait is recorded."""
    origin, endpoint = "http://127.0.0.1:8006", "http://127.0.0.1:8006/hook"
    with guard.ride(endpoint) as ride:
        ahead(ledger, ride)
        assert guard.admit(origin, endpoint, time.time()) == ADMITTED
        guard.report(origin, endpoint, "failure", time.time())
        assert in_flight(guard, origin) == 1
        ride.flush()
        assert in_flight(guard, origin) == 0
        assert ride.reports == []
