"""Batched fan-out on Celery: ``submit_many`` sends chunks, each call keeps its own fate.

Real Redis (database 6, this module's own), a real prefork worker, the Node
peer as the receiver: ``/echo`` tells what each request carried, ``/flaky``
answers 503 to the first ``fail`` requests of each Idempotency-Key, ``/seen``
counts them, ``/status/503`` always fails. The worker's log says which
messages it received: one per chunk, and a single message per later attempt.
Without Redis these tests skip with the reason (and fail in CI).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from dispatchkit_celery import dead_letters
from dispatchkit_celery._config import WorkerConfig
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery._task import _out_of_time
from dispatchkit_celery._wire import BATCH_TASK_NAME, TASK_NAME, message_kwargs
from dispatchkit_celery.testing import REDIS_URL, Worker, celery_worker

from conftest import peer_stats
from dispatchkit import Call, Dispatcher, HTTPStatusError, UsageError, states
from support import celery_env
from support.celery_env import ledger_on, redis_db
from support.node_peer import node_peer

#: The test suite's Redis, database 6: this module's own.
URL = urlunsplit(urlsplit(REDIS_URL)._replace(path="/6"))
QUEUE = f"dispatchkit-fanout-{uuid.uuid4().hex[:8]}"
BATCH = 100
SETTINGS: dict[str, object] = {
    "timeout": 2,
    "deadline": 3,
    "visibility_timeout": 30,  # a chunk's calls may start within its first 22.5 s
    "delivery_poll_interval": 0.1,
    "delivery_claim_lease": 3,
    "pool_maxsize": 8,
    "circuit_breaker": False,  # the tests fail one origin on purpose
}
#: How long a test waits for what must happen (never an assertion on speed).
PATIENCE = 25.0

pytestmark = pytest.mark.timeout(30)


def eventually(condition: Callable[[], bool], timeout: float = PATIENCE) -> bool:
    return celery_env.eventually(condition, timeout)


def received(worker: Worker, task: str) -> list[str]:
    """The ids of the messages of ``task`` the worker logged as received so far."""
    worker.wait_for("\0", 0.5)  # takes in what the worker wrote meanwhile
    pattern = re.compile(rf"Task {re.escape(task)}\[([0-9a-f-]+)\] received")
    return [m.group(1) for line in worker.log if (m := pattern.search(line))]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_db(URL) as url:
        yield url


@pytest.fixture(scope="module", params=["asyncio", "threads"])
def worker(redis_url: str, request: pytest.FixtureRequest) -> Iterator[Worker]:
    """A worker whose chunks run on an event loop, or on threads: every test runs on both."""
    settings = {**SETTINGS, "chunk_runner": request.param}
    with celery_worker(QUEUE, concurrency=2, url=redis_url, worker_settings=settings) as running:
        running.chunk_runner = request.param  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Ledger]:
    with ledger_on(redis_url) as opened:
        yield opened


@pytest.fixture
def durable(worker: Worker, make_dispatcher: Any) -> Callable[..., Dispatcher]:
    def make(**settings: Any) -> Dispatcher:
        settings.setdefault("retry_jitter", 0)
        settings.setdefault("celery_batch_size", BATCH)
        dispatcher: Dispatcher = make_dispatcher(
            executor="celery", celery_broker=URL, celery_queue=QUEUE,
            celery_get_timeout=PATIENCE, **settings,
        )  # fmt: skip
        return dispatcher

    return make


def test_250_calls_in_3_messages(
    worker: Worker, durable: Callable[..., Dispatcher], peer: str
) -> None:
    d = durable()
    d.call(f"{peer}/stats/reset")
    results: list[Any] = d.submit_many(f"{peer}/echo", [{"x": i} for i in range(250)])
    echoes = [r.get() for r in results]
    assert [e["args"] for e in echoes] == [{"x": str(i)} for i in range(250)]
    keys = [e["headers"]["idempotency-key"] for e in echoes]
    assert keys == [r.id for r in results]
    assert len(set(keys)) == 250
    assert all(r.state == states.SUCCESS for r in results)
    assert peer_stats(d, peer)["requests"] == 250 + 1  # each key once (and this call)
    chunks = received(worker, BATCH_TASK_NAME)
    assert len(chunks) == math.ceil(250 / BATCH)
    assert not set(received(worker, TASK_NAME)) & set(keys)  # no call came alone
    assert [a.number for a in results[0].attempts] == [1]
    on_a_loop = any("chunks run on an event loop" in line for line in worker.log)
    assert on_a_loop == (worker.chunk_runner == "asyncio")  # type: ignore[attr-defined]


def test_the_results_of_a_batch_are_read_in_bulk(
    worker: Worker, durable: Callable[..., Dispatcher], peer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a batch's calls are done, reading their 200 results takes four MGETs (16, 32,
    64, then the 88 left), each result asked for once: not a read each."""
    d = durable()
    results: list[Any] = d.submit_many(f"{peer}/multiply", [{"x": i, "y": 2} for i in range(200)])
    assert eventually(lambda: results[-1].ready() and all(r.ready() for r in results))
    client = d._get_executor().app.backend.client  # type: ignore[attr-defined]
    reads: list[tuple[str, int]] = []
    for name in ("get", "mget"):
        real = getattr(client, name)

        def counted(keys: Any, *args: Any, _real: Any = real, _name: str = name) -> Any:
            reads.append((_name, len(keys) if _name == "mget" else 1))
            return _real(keys, *args)

        monkeypatch.setattr(client, name, counted)
    assert [r.get() for r in results] == [2 * i for i in range(200)]
    assert reads == [("mget", 16), ("mget", 32), ("mget", 64), ("mget", 88)]  # each once


def test_a_failed_call_retries_alone_while_its_chunk_mates_complete(
    worker: Worker, durable: Callable[..., Dispatcher], ledger: Ledger, peer: str
) -> None:
    d = durable(retry_schedule=[60])
    calls = [{"fail": 0, "n": i} for i in range(4)] + [{"fail": 1, "n": 4}]
    before = len(received(worker, BATCH_TASK_NAME))
    results: list[Any] = d.submit_many(f"{peer}/flaky", calls)
    flaky = results[-1]
    assert [r.get() for r in results[:-1]] == [1, 1, 1, 1]
    assert eventually(lambda: ledger.client.hget(ledger.call_key(flaky.id), "state") == b"waiting")
    assert flaky.state == states.RETRY
    assert flaky.due is not None
    assert [a.outcome for a in flaky.attempts] == ["503"]
    ledger.client.zadd(ledger.due, {flaky.id: 0})  # due now (the test cannot wait 60 s)
    assert flaky.get() == 2
    assert [a.number for a in flaky.attempts] == [1, 2]
    assert len(received(worker, BATCH_TASK_NAME)) == before + 1
    assert received(worker, TASK_NAME).count(flaky.id) == 1  # the second attempt, alone


def test_calls_without_a_schedule_run_in_chunks_once_each(
    worker: Worker, durable: Callable[..., Dispatcher], ledger: Ledger, peer: str
) -> None:
    d = durable(retry_schedule=None)
    results: list[Any] = d.submit_many(f"{peer}/multiply", [{"x": i, "y": 3} for i in range(30)])
    results += d.submit_many(f"{peer}/status/503", [{"n": 1}])
    assert [r.get() for r in results[:-1]] == [3 * i for i in range(30)]
    with pytest.raises(HTTPStatusError) as caught:
        results[-1].get()
    assert caught.value.status == 503  # one attempt, no wait: nothing in the ledger
    assert results[-1].state == states.FAILURE
    assert [a.outcome for a in results[-1].attempts] == ["503"]
    assert ledger.client.exists(ledger.call_key(results[-1].id)) == 0


def test_a_call_whose_schedule_runs_out_is_a_dead_letter(
    worker: Worker, durable: Callable[..., Dispatcher], peer: str
) -> None:
    d = durable(retry_schedule=[0.2])
    results = d.submit_many(f"{peer}/multiply", [{"x": 2, "y": 3}])
    results += d.submit_many(f"{peer}/status/503", [{"n": 1}])
    assert results[0].get() == 6
    with pytest.raises(HTTPStatusError) as caught:
        results[1].get()
    assert caught.value.status == 503
    letter = dead_letters(d).get(results[1].id)
    assert letter is not None
    assert [a.outcome for a in letter.attempts] == ["503", "503"]


def test_a_chunk_delivered_again_runs_none_of_its_finished_calls(
    worker: Worker, durable: Callable[..., Dispatcher], ledger: Ledger, peer: str
) -> None:
    d = durable(retry_schedule=[60])
    results = d.submit_many(f"{peer}/flaky", [{"fail": 0, "n": i} for i in range(3)])
    assert [r.get() for r in results] == [1, 1, 1]
    # The same chunk again, as the broker would hand it back after a crash.
    calls = [
        Call(f"{peer}/flaky", "GET", {"fail": 0, "n": i}, r.id).to_dict()
        for i, r in enumerate(results)
    ]
    executor: Any = d._get_executor()
    executor.app.send_task(
        BATCH_TASK_NAME, args=[calls], kwargs=message_kwargs(1, executor._schedule), queue=QUEUE
    )
    duplicates = [ledger.call_key(r.id) for r in results]
    assert eventually(
        lambda: all(ledger.client.hget(key, "duplicates") == b"1" for key in duplicates)
    )
    seen = Dispatcher(timeout=5)
    try:
        counts = seen.call(f"{peer}/seen")
    finally:
        seen.close()
    assert [counts[r.id] for r in results] == [1, 1, 1]
    assert [r.get() for r in results] == [1, 1, 1]


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "100", 10_001])
def test_a_bad_batch_size_is_a_usage_error(size: object) -> None:
    with pytest.raises(UsageError, match="celery_batch_size"):
        Dispatcher(executor="celery", celery_broker=URL, celery_batch_size=size)


def test_a_chunk_starts_a_call_only_if_it_ends_within_the_visibility_timeout() -> None:
    config = WorkerConfig.from_settings("redis://127.0.0.1:6379/6", {"timeout": 10})
    now = time.monotonic()
    # The longest attempt is 6 x 10 s; the chunk may fill 85% of the 90 s visibility timeout.
    assert not _out_of_time(config, None, now)
    assert not _out_of_time(config, None, now - 15)
    assert _out_of_time(config, None, now - 17)
    assert not _out_of_time(config, 1, now - 60)  # a call of its own short timeout
    assert not _out_of_time(config, 20, now)  # too long even alone: refused as a single call is
    rabbit = WorkerConfig.from_settings(
        "amqp://127.0.0.1//", {"timeout": 10, "delivery_redis": "redis://127.0.0.1:6379/6"}
    )
    assert not _out_of_time(rabbit, None, now - 1000)


def _overlap(spans: list[tuple[float, float]]) -> int:
    """The most of ``spans`` (start, end) under way at one moment."""
    return max(sum(start <= at < end for start, end in spans) for at, _ in spans)


def test_a_slow_receiver_holds_back_its_own_calls_of_a_chunk_and_no_others(
    redis_url: str, make_dispatcher: Any, peer: str
) -> None:
    """One chunk of calls to two receivers (``submit_calls``), on the event loop: at most
    ``pool_maxsize`` calls to one origin at once, held before their attempt starts, and
    up to ``chunk_concurrency`` in all. Four slow calls first in the chunk run two at a
    time; the four calls to the other receiver behind them run meanwhile (pulled one
    origin-blind line at a time, they would wait for the slow ones)."""
    queue = f"dispatchkit-fanout-origins-{uuid.uuid4().hex[:8]}"
    settings = {**SETTINGS, "chunk_runner": "asyncio", "pool_maxsize": 2, "chunk_concurrency": 8}
    with (
        celery_worker(queue, concurrency=1, url=redis_url, worker_settings=settings) as running,
        node_peer() as other,
    ):
        d: Dispatcher = make_dispatcher(
            executor="celery", celery_broker=URL, celery_queue=queue,
            celery_get_timeout=PATIENCE, retry_jitter=0,
        )  # fmt: skip
        calls = [Call(f"{peer}/slow", "GET", {"delay": 1000, "n": i}) for i in range(4)]
        calls += [Call(f"{other}/echo", "GET", {"n": i}) for i in range(4)]
        results: list[Any] = d.submit_calls(calls)
        assert [r.get() for r in results[:4]] == [1000] * 4
        assert [r.get()["args"] for r in results[4:]] == [{"n": str(i)} for i in range(4)]
        assert len(received(running, BATCH_TASK_NAME)) == 1  # one chunk, both receivers
        assert any("up to 8 calls of a chunk at a time, 2 per origin" in x for x in running.log)
    slow = [(a.started, a.started + a.duration) for r in results[:4] for a in r.attempts]
    fast = [(a.started, a.started + a.duration) for r in results[4:] for a in r.attempts]
    assert len(slow) == len(fast) == 4  # one attempt each
    assert _overlap(slow) == 2  # pool_maxsize to the slow origin, and no more
    assert max(end for _, end in fast) < min(end for _, end in slow)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8", 1001])
def test_a_bad_chunk_concurrency_is_a_usage_error(value: object) -> None:
    with pytest.raises(UsageError, match="chunk_concurrency"):
        WorkerConfig.from_settings(URL, {"chunk_concurrency": value})
