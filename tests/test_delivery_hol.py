"""No head-of-line blocking: calls waiting in backoff hold no worker, so other calls run.

Real Redis, a real prefork worker (2 processes). 200 calls to a dead receiver
(a loopback port nobody listens on: every attempt is refused) fail once and
wait 30 s in the delivery ledger for their next attempt. While they wait, the
test asserts where they are (the ledger: 200 waiting entries, state RETRY),
where they are not (no worker process runs or holds them: Celery's
``inspect()`` shows none of them active or reserved; the broker's queue and
its unacknowledged messages hold none), and that calls to a healthy receiver
all complete on the same worker meanwhile, with the 200 still waiting. How
fast those calls run beside the waiting ones, against alone, is a benchmark
target (``benchmarks/celery_throughput.py``: >= 0.90 x), never a test result.

The test uses a Redis database of its own (8 on the test suite's Redis), so
that other test modules that empty theirs at the same time leave it alone.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery
from dispatchkit_celery._app import make_app
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery.testing import REDIS_URL, Worker, celery_worker

from dispatchkit import Dispatcher, states
from support import celery_env
from support.celery_env import ledger_on, redis_db
from support.scripted_server import RawRequest, ScriptedServer, envelope, response, serve

#: The test suite's Redis, database 8: this module's own.
URL = urlunsplit(urlsplit(REDIS_URL)._replace(path="/8"))
QUEUE = f"dispatchkit-hol-{uuid.uuid4().hex[:8]}"
PROCESSES = 2
WAITING = 200
#: Seconds the waiting calls wait: far longer than the test looks at them.
WAIT = 30.0
HEALTHY = 40
#: How long the healthy receiver takes to answer: long enough that a look at the
#: worker while the healthy calls run finds some of them active.
ANSWER_AFTER = 0.05
#: How long the test waits for what must happen (never an assertion on speed).
PATIENCE = 60.0
SETTINGS: dict[str, object] = {
    "timeout": 2,
    "deadline": 3,
    "visibility_timeout": 5,
    "delivery_poll_interval": 0.1,
    # A breaker would turn most of the 200 away unattempted (deferred, in the same
    # ledger): this test is about calls that made their attempt and wait in backoff.
    "circuit_breaker": False,
    "disable": ["example", "signing"],
}


def eventually(condition: Callable[[], bool], timeout: float = PATIENCE) -> bool:
    return celery_env.eventually(condition, timeout)


def dead_url() -> str:
    """A loopback port nobody listens on: connection refused, at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def ledger_states(ledger: Ledger, ids: list[str]) -> list[bytes | None]:
    with ledger.client.pipeline(transaction=False) as pipe:
        for task_id in ids:
            pipe.hget(ledger.call_key(task_id), "state")
        found: list[bytes | None] = pipe.execute()
    return found


def held_by_workers(app: Celery) -> set[str]:
    """The task ids the workers run (``active``) or hold prefetched (``reserved``)."""
    inspect = app.control.inspect(timeout=5.0, limit=1)  # one worker: its reply ends the wait
    held: set[str] = set()
    for method in (inspect.active, inspect.reserved):
        replies = method()
        assert replies, "the worker did not answer inspect()"
        held |= {task["id"] for tasks in replies.values() for task in tasks}
    return held


def in_broker(db: redis.Redis, ids: set[str]) -> set[str]:
    """Which of ``ids`` have a message in the queue or among the unacknowledged ones."""
    messages = [*db.lrange(QUEUE, 0, -1), *db.hvals("unacked")]
    return {task_id for task_id in ids if any(task_id.encode() in m for m in messages)}


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_db(URL) as url:
        yield url


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Worker]:
    with celery_worker(
        QUEUE, concurrency=PROCESSES, url=redis_url, worker_settings=SETTINGS
    ) as running:
        yield running


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Ledger]:
    with ledger_on(redis_url) as opened:
        yield opened


@pytest.fixture
def control(redis_url: str) -> Iterator[Celery]:
    """A Celery app on the workers' broker, to ask them what they hold."""
    app = make_app(redis_url)
    yield app
    app.close()


@pytest.fixture
def healthy() -> Iterator[ScriptedServer]:
    def answer(request: RawRequest) -> bytes:
        time.sleep(ANSWER_AFTER)
        return response(200, envelope("ok"))

    with ScriptedServer([serve(answer)], connection_deadline=PATIENCE) as server:
        yield server


@pytest.fixture
def celery_dispatcher(redis_url: str, make_dispatcher: Any) -> Callable[..., Dispatcher]:
    def make(**settings: Any) -> Dispatcher:
        dispatcher: Dispatcher = make_dispatcher(
            executor="celery", celery_broker=redis_url, celery_queue=QUEUE,
            celery_get_timeout=PATIENCE, retry_jitter=0, **settings,
        )  # fmt: skip
        return dispatcher

    return make


# -- the test ---------------------------------------------------------------------------


def test_calls_waiting_in_backoff_hold_no_worker_and_others_complete(
    worker: Worker,
    ledger: Ledger,
    control: Celery,
    healthy: ScriptedServer,
    celery_dispatcher: Callable[..., Dispatcher],
) -> None:
    db = ledger.client
    backoff, d = celery_dispatcher(retry_schedule=[WAIT]), celery_dispatcher()
    dead = dead_url()
    submitted = time.time()
    waiting = [backoff.submit(dead) for _ in range(WAITING)]
    ids = [r.id for r in waiting]
    try:
        # Each fails once (refused) and waits in the ledger for attempt 2, WAIT s away.
        assert eventually(lambda: ledger_states(ledger, ids) == [b"waiting"] * WAITING)
        due: list[float | None] = db.zmscore(ledger.due, ids)
        assert all(at is not None and at >= submitted + WAIT for at in due)
        assert {int(db.hget(ledger.call_key(task_id), "attempt") or 0) for task_id in ids} == {2}
        assert {r.state for r in waiting[:10]} == {states.RETRY}

        # Nothing of them on the worker or in the broker: no process waits for them (the
        # last one's message is acknowledged just after its wait is recorded: eventually).
        assert eventually(lambda: not held_by_workers(control) & set(ids))
        assert not in_broker(db, set(ids))

        # Healthy calls run on the same two processes meanwhile; the looks at the
        # worker while they run find them, and never one of the waiting calls.
        results = [d.submit(healthy.url + "/ok") for _ in range(HEALTHY)]
        seen: set[str] = set()
        deadline = time.monotonic() + PATIENCE
        while not all(r.ready() for r in results) and time.monotonic() < deadline:
            seen |= held_by_workers(control)
        assert [r.get() for r in results] == ["ok"] * HEALTHY
        healthy_ids = {r.id for r in results}
        assert seen, "inspect() never saw a healthy call running"
        assert seen <= healthy_ids
        assert sorted(r.headers["idempotency-key"] for r in healthy.requests) == sorted(healthy_ids)
        # ... and the waiting calls are still where they were, none tried again.
        assert ledger_states(ledger, ids) == [b"waiting"] * WAITING
        assert not in_broker(db, set(ids))
    finally:
        for task_id in ids:  # they never come back: their next attempt is not sent
            ledger.forget(task_id)
    assert db.zscore(ledger.due, ids[0]) is None
