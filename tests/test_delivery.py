"""Durable retry schedules on Celery: real Redis, real prefork workers, real kills.

A receiver on loopback answers each path by plan, per Idempotency-Key, and
records every request; the tests assert on what it saw (how many attempts,
with which key) and on the delivery ledger in Redis. Schedules are seconds
long here, visibility timeouts a few seconds. Without Redis these tests skip
with the reason (and fail in CI, where Redis is promised).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import redis
from dispatchkit_celery._config import WorkerConfig
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery._schedule import RetrySchedule
from dispatchkit_celery._wire import TASK_NAME, message_kwargs
from dispatchkit_celery.testing import REDIS_URL, Worker, celery_worker

from dispatchkit import (
    ConnectError,
    Dispatcher,
    HTTPStatusError,
    InvalidResponseError,
    RemoteExecuteError,
    UsageError,
    states,
)
from support import celery_env
from support.celery_env import ledger_on, redis_db
from support.scripted_server import Connection, ScriptedServer, envelope, response

QUEUE = f"dispatchkit-delivery-{uuid.uuid4().hex[:8]}"
#: Attempts of at most 3 s, under a visibility timeout of 5 s; due calls looked for 10 times a s.
FAST: dict[str, object] = {
    "timeout": 2,
    "deadline": 3,
    "visibility_timeout": 5,
    "delivery_poll_interval": 0.1,
    "delivery_claim_lease": 3,
    # The schedule's own retries are counted here: without the breaker (on by default on
    # Celery) that would defer them once 5 attempts in a row to one receiver failed.
    "circuit_breaker": False,
}
#: How long a test waits for what must happen (never an assertion on speed).
PATIENCE = 60.0


# -- the receiver ---------------------------------------------------------------------

HANG = b"<hang>"  # no answer: hold the request until the client goes away
DROP = b"<drop>"  # close the connection without an answer


def ok(retval: object = "ok") -> bytes:
    return response(200, envelope(retval))


def status(code: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> bytes:
    return response(code, body, headers or {}, content_type="text/plain")


def failure(reason: str, code: int = 200) -> bytes:
    return response(code, json.dumps({"status": "failure", "reason": reason}).encode())


class Receiver:
    """Answers the n-th request of one Idempotency-Key to ``path`` with ``plans[path][n-1]``.

    The last answer of a plan repeats. Every request is recorded by the server.
    """

    def __init__(self, plans: Mapping[str, Sequence[bytes]]) -> None:
        self.plans = dict(plans)
        self.server = ScriptedServer(self._serve, connection_deadline=120, max_connections=1000)

    def __enter__(self) -> Receiver:
        self.server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.__exit__(*exc_info)  # type: ignore[arg-type]

    def url(self, path: str) -> str:
        return self.server.url + path

    def _serve(self, conn: Connection) -> None:
        while (request := conn.read_request()) is not None:
            path = request.target.partition("?")[0]
            plan = self.plans[path]
            seen = self.keys(path).count(request.headers.get("idempotency-key", ""))
            answer = plan[min(seen, len(plan)) - 1]
            if answer == HANG:
                conn.wait_for_close()
                return
            if answer == DROP:
                conn.close()
                return
            conn.send(answer)

    def requests(self, path: str) -> list[Any]:
        return [r for r in list(self.server.requests) if r.target.partition("?")[0] == path]

    def keys(self, path: str) -> list[str]:
        """The Idempotency-Key of every request to ``path``, in order of arrival."""
        return [r.headers.get("idempotency-key", "") for r in self.requests(path)]

    def wait_for(self, path: str, count: int) -> bool:
        return self.server.wait_until(lambda _: len(self.requests(path)) >= count, PATIENCE)


def waits(ledger: Ledger, result: Any) -> bool:
    """Whether the ledger holds the call for its next attempt (it is written after RETRY)."""
    return bool(ledger.client.hget(ledger.call_key(result.id), "state") == b"waiting")


def eventually(condition: Callable[[], bool], timeout: float = PATIENCE) -> bool:
    return celery_env.eventually(condition, timeout)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_db(REDIS_URL) as url:
        yield url


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Worker]:
    """One worker process: a call that waits must leave it free for others."""
    with celery_worker(QUEUE, concurrency=1, url=redis_url, worker_settings=FAST) as running:
        yield running


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Ledger]:
    """The workers' ledger, to look into (and move a due time forward)."""
    with ledger_on(redis_url) as opened:
        yield opened


@pytest.fixture
def db(ledger: Ledger) -> redis.Redis:
    return ledger.client


@pytest.fixture
def durable(redis_url: str, make_dispatcher: Any) -> Callable[..., Dispatcher]:
    """Dispatchers on the Celery executor with a durable schedule (no jitter unless asked)."""

    def make(queue: str = QUEUE, **settings: Any) -> Dispatcher:
        settings.setdefault("retry_jitter", 0)
        dispatcher: Dispatcher = make_dispatcher(
            executor="celery", celery_broker=redis_url, celery_queue=queue,
            celery_get_timeout=PATIENCE, **settings,
        )  # fmt: skip
        return dispatcher

    return make


# -- the schedule -----------------------------------------------------------------------


def test_a_failed_attempt_waits_in_the_ledger_and_frees_the_worker(
    worker: Worker, durable: Callable[..., Dispatcher], ledger: Ledger, db: redis.Redis
) -> None:
    plans = {"/flaky": [status(503), ok("third time")], "/healthy": [ok("at once")]}
    with Receiver(plans) as receiver:
        d = durable(retry_schedule=[60, 60])
        first: Any = d.submit(receiver.url("/flaky"))  # a CeleryResult: it has .due
        assert eventually(lambda: waits(ledger, first))
        assert first.state == states.RETRY  # written before the ledger
        assert not first.ready()
        assert first.result is None
        due = first.due
        assert due is not None
        assert due > time.time() + 30  # the 60 s wait, outside any worker
        assert db.zscore(ledger.due, first.id) == pytest.approx(due)
        # The one worker process is free: another call runs while the first one waits.
        assert d.submit(receiver.url("/healthy")).get() == "at once"
        assert first.state == states.RETRY
        db.zadd(
            ledger.due, {first.id: time.time()}
        )  # its time has come (the test cannot wait 60 s)
        assert first.get() == "third time"
    assert first.state == states.SUCCESS
    assert first.due is None
    assert receiver.keys("/flaky") == [first.id, first.id]


def test_post_is_retried_with_one_idempotency_key_and_retry_after_is_honoured(
    worker: Worker, durable: Callable[..., Dispatcher]
) -> None:
    plans = {
        "/hook": [
            DROP,  # a broken connection
            status(503, b"busy", {"Retry-After": "3600"}),  # asks for an hour: capped
            status(429, b"slow down", {"Retry-After": "0"}),  # asks for nothing
            ok("delivered"),
        ]
    }
    with Receiver(plans) as receiver:
        # Waits of 30 s that the test never sees: the first is 0.2 s, Retry-After sets the rest.
        d = durable(retry_schedule=[0.2, 30, 30], retry_after_max=0.5)
        result = d.apply_async(receiver.url("/hook"), "POST", {"event": "paid"}, json=True)
        assert result.get() == "delivered"
    hooks = receiver.requests("/hook")
    assert [r.method for r in hooks] == ["POST"] * 4
    assert {r.headers["idempotency-key"] for r in hooks} == {result.id}
    assert {r.body for r in hooks} == {b'{"event":"paid"}'}


def test_the_tasks_failure_a_404_and_an_invalid_answer_are_final(
    worker: Worker, durable: Callable[..., Dispatcher], ledger: Ledger, db: redis.Redis
) -> None:
    plans = {
        "/fail": [failure("card declined")],
        "/fail500": [failure("disk full", 500)],
        "/missing": [status(404, b"nope")],
        "/garbage": [response(200, b"{not json")],
    }
    with Receiver(plans) as receiver:
        d = durable(retry_schedule=[0.1, 0.1])
        results = {path: d.apply_async(receiver.url(path), "POST") for path in plans}
        with pytest.raises(RemoteExecuteError, match="card declined"):
            results["/fail"].get()
        with pytest.raises(RemoteExecuteError, match="disk full") as info:
            results["/fail500"].get()
        assert info.value.status == 500  # a 5xx, but the task's own failure: final
        with pytest.raises(HTTPStatusError) as missing:
            results["/missing"].get()
        assert missing.value.status == 404
        with pytest.raises(InvalidResponseError):
            results["/garbage"].get()
    for path, result in results.items():
        assert receiver.keys(path) == [result.id], path  # one attempt each
        assert result.state == states.FAILURE
    # Each is marked done once its result is stored: at most a moment after get() returned.
    keys = [ledger.call_key(result.id) for result in results.values()]
    assert eventually(lambda: all(db.hget(key, "state") == b"done" for key in keys))


def test_an_exhausted_schedule_fails_with_the_last_error(
    worker: Worker, durable: Callable[..., Dispatcher]
) -> None:
    plans = {"/busy": [status(503, b"busy 1"), status(503, b"busy 2"), status(503, b"busy 3")]}
    with Receiver(plans) as receiver:
        d = durable(retry_schedule=[0.2, 0.2])
        result = d.submit(receiver.url("/busy"))
        with pytest.raises(HTTPStatusError) as info:
            result.get()
    assert (info.value.status, info.value.body_excerpt) == (503, b"busy 3")
    assert receiver.keys("/busy") == [result.id] * 3  # one attempt per delivery, no more
    with durable(retry_schedule=[0.2]) as d, pytest.raises(ConnectError):
        d.submit("http://127.0.0.1:9/unreachable").get()


def test_retry_schedule_none_makes_one_attempt(
    worker: Worker, durable: Callable[..., Dispatcher], ledger: Ledger, db: redis.Redis
) -> None:
    with Receiver({"/busy": [status(503)]}) as receiver:
        result = durable(retry_schedule=None).submit(receiver.url("/busy"))
        with pytest.raises(HTTPStatusError):
            result.get()
    assert receiver.keys("/busy") == [result.id]
    assert not db.exists(ledger.call_key(result.id))  # no ledger without a schedule


def test_a_calls_timeout_must_fit_under_the_visibility_timeout() -> None:
    config = WorkerConfig.from_settings(REDIS_URL, {"timeout": 2, "visibility_timeout": 20})
    config.check_deadline(2)  # 6 x 2 s attempts: 1.5 times that fits under 20 s
    with pytest.raises(UsageError, match="a call's timeout of 3s"):
        config.check_deadline(3)
    # With a deadline of its own, the worker bounds every attempt, whatever the call asks.
    bounded = WorkerConfig.from_settings(REDIS_URL, {"deadline": 10, "visibility_timeout": 20})
    bounded.check_deadline(100)


# -- duplicates -------------------------------------------------------------------------


def test_copies_of_a_taken_or_finished_attempt_are_dropped(
    worker: Worker, durable: Callable[..., Dispatcher], ledger: Ledger, db: redis.Redis
) -> None:
    def resend(result: Any, attempt: int, schedule: dict[str, Any]) -> None:
        executor: Any = d._get_executor()
        call = {"url": receiver.url("/count"), "method": "GET", "kwargs": {}, "task_id": result.id,
                "timeout": None, "headers": None, "json": False}  # fmt: skip
        executor.app.send_task(
            TASK_NAME, args=[call], kwargs=message_kwargs(attempt, schedule),
            task_id=result.id, queue=QUEUE,
        )  # fmt: skip

    def duplicates(result: Any) -> int:
        return int(db.hget(ledger.call_key(result.id), "duplicates") or 0)

    plans = {"/count": [status(503), ok("second")]}
    with Receiver(plans) as receiver:
        d = durable(retry_schedule=[60])
        schedule = RetrySchedule((60,), jitter=0).to_dict()
        waiting = d.submit(receiver.url("/count"))
        assert eventually(lambda: waits(ledger, waiting))
        resend(waiting, 1, schedule)  # attempt 1 is over: its copy goes
        assert eventually(lambda: duplicates(waiting) == 1)
        assert waiting.state == states.RETRY
        db.zadd(ledger.due, {waiting.id: time.time()})
        assert waiting.get() == "second"
        resend(waiting, 2, schedule)  # a copy of the attempt that succeeded
        assert eventually(lambda: duplicates(waiting) == 2)
    assert receiver.keys("/count") == [waiting.id] * 2
    assert waiting.state == states.SUCCESS


def test_a_message_lost_on_its_way_is_sent_again(
    redis_url: str, worker: Worker, durable: Callable[..., Dispatcher], db: redis.Redis
) -> None:
    queue = f"{QUEUE}-lost"
    with Receiver({"/once": [ok("arrived")]}) as receiver:
        d = durable(queue, delivery_resend_after=1)
        result = d.submit(receiver.url("/once"))
        assert db.llen(queue) == 1  # no worker takes this queue yet
        db.delete(queue)  # lost, as a message is when a worker dies as it takes it off the list
        # The running worker's poller sends it again: the ledger still expects it taken.
        assert eventually(lambda: db.llen(queue) >= 1)
        with celery_worker(queue, concurrency=1, url=redis_url, worker_settings=FAST):
            assert result.get() == "arrived"
    assert receiver.keys("/once") == [result.id]


# -- kill -9 --------------------------------------------------------------------------


def test_kill_9_during_an_attempt_and_during_a_wait_loses_nothing(
    redis_url: str, durable: Callable[..., Dispatcher], ledger: Ledger, db: redis.Redis
) -> None:
    queue = f"{QUEUE}-kill"
    plans = {"/wait": [status(503), ok("waited")], "/hang": [HANG, ok("redelivered")]}
    with Receiver(plans) as receiver:
        d = durable(queue, retry_schedule=[8])
        with celery_worker(queue, concurrency=2, url=redis_url, worker_settings=FAST) as first:
            waiting = d.submit(receiver.url("/wait"))
            assert eventually(lambda: waits(ledger, waiting))
            running = d.submit(receiver.url("/hang"))
            assert receiver.wait_for("/hang", 1)  # its attempt is in flight
            first.kill()  # the main process and its pool, all at once
            killed_at = time.time()
        due = db.zscore(ledger.due, waiting.id)
        assert due is not None
        assert due > killed_at  # the kill came during the wait
        with celery_worker(queue, concurrency=2, url=redis_url, worker_settings=FAST):
            # Due in 8 s; the cut-off attempt is handed back 5 s (the visibility timeout)
            # after its delivery, found within a second by the new worker.
            assert waiting.get() == "waited"
            assert running.get() == "redelivered"
    assert receiver.keys("/wait") == [waiting.id] * 2
    assert receiver.keys("/hang") == [running.id] * 2
    # The cut-off attempt never failed: the broker handed the same message back.
    assert not db.hexists(ledger.call_key(running.id), "error")


# -- the ledger and its pollers -------------------------------------------------------------


def test_two_workers_send_each_due_attempt_once(
    redis_url: str, worker: Worker, durable: Callable[..., Dispatcher]
) -> None:
    with (
        Receiver({"/twice": [status(503), ok("done")]}) as receiver,
        celery_worker(QUEUE, concurrency=2, url=redis_url, worker_settings=FAST),
    ):
        d = durable(retry_schedule=[0.3])
        results = [d.submit(receiver.url("/twice")) for _ in range(30)]
        assert [r.get() for r in results] == ["done"] * 30
    keys = receiver.keys("/twice")
    assert sorted(keys) == sorted(r.id for r in results for _ in range(2))


def test_claims_are_exclusive_and_come_back_after_the_lease(redis_url: str) -> None:
    # A namespace of its own: the pollers of the running workers never see these entries.
    namespace = f"test:{uuid.uuid4().hex}:"
    ledgers = [Ledger(redis_url, namespace) for _ in range(4)]
    ledger = ledgers[0]
    try:
        client = ledger.client
        now = time.time()
        client.zadd(ledger.due, {f"claim-{i}": now - 1 for i in range(400)})
        claimed: list[list[str]] = [[] for _ in ledgers]

        def drain(index: int) -> None:
            while batch := ledgers[index].claim(lease=60, limit=7).task_ids:
                claimed[index] += batch

        threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(ledgers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(PATIENCE)
        everything = [task_id for batch in claimed for task_id in batch]
        assert sorted(everything) == sorted(f"claim-{i}" for i in range(400))  # each once

        # A poller that dies after claiming: its entries come back when the lease ends.
        client.delete(ledger.due)
        client.zadd(ledger.due, {"orphan": time.time() - 1, "rescheduled": time.time() - 1})
        claim = ledger.claim(lease=0.5, limit=10)
        assert sorted(claim.task_ids) == ["orphan", "rescheduled"]
        assert ledgers[1].claim(lease=0.5, limit=10).task_ids == []
        client.zadd(ledger.due, {"rescheduled": time.time() + 3600})  # a worker moved it meanwhile
        assert not ledger.release("rescheduled", claim, None)  # so the claim is void
        assert eventually(lambda: ledgers[1].claim(lease=60, limit=10).task_ids == ["orphan"])
    finally:
        ledger.client.delete(ledger.due)
        for opened in ledgers:
            opened.close()


def test_the_first_copy_of_an_attempt_to_arrive_takes_it(redis_url: str) -> None:
    ledger = Ledger(redis_url, f"test:{uuid.uuid4().hex}:")
    task_id = "take"
    try:
        ledger.enqueue(task_id, {"url": "http://x/"}, {}, QUEUE, resend_after=60)
        assert ledger.client.zscore(ledger.due, task_id) is not None  # to be sent again if lost
        assert ledger.take(task_id, 1, "copy-a")
        assert ledger.client.zscore(ledger.due, task_id) is None  # taken: no resend
        assert not ledger.take(task_id, 1, "copy-b")  # a second copy of attempt 1
        assert ledger.take(task_id, 1, "copy-a")  # the broker handed the first one back
        ledger.wait(task_id, {"url": "http://x/"}, {}, QUEUE, 2, time.time() + 60, {})
        assert not ledger.take(task_id, 1, "copy-a")  # attempt 1 is over
        assert ledger.take(task_id, 2, "copy-c")
        ledger.finish(task_id, 2, ttl=60)
        assert not ledger.take(task_id, 2, "copy-c")  # the call is over
        assert ledger.client.hget(ledger.call_key(task_id), "duplicates") == b"3"
        assert ledger.take(f"{task_id}-unknown", 1, "copy-d")  # no record: it runs
    finally:
        ledger.client.delete(ledger.call_key(task_id), ledger.due)
        ledger.close()


# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("retry_schedule", "5"),
        ("retry_schedule", 5),
        ("retry_schedule", [5, -1]),
        ("retry_schedule", [float("nan")]),
        ("retry_schedule", [True]),
        ("retry_schedule", [1] * 101),
        ("retry_jitter", 1),
        ("retry_jitter", -0.1),
        ("retry_after_max", 0),
        ("retry_methods", "POST"),
        ("retry_methods", []),
        ("retry_methods", ["PO ST"]),
        ("retry_statuses", [200]),
        ("retry_statuses", [True]),
        ("retry_statuses", "503"),
        ("delivery_resend_after", 0),
    ],
)
def test_bad_caller_settings_are_usage_errors(setting: str, value: object) -> None:
    settings: dict[str, Any] = {setting: value}
    with pytest.raises(UsageError, match=setting):
        Dispatcher(executor="celery", **settings)


@pytest.mark.parametrize(
    "schedule",
    [
        RetrySchedule(),
        RetrySchedule(
            (1, 2),
            jitter=0,
            methods=frozenset({"POST"}),
            statuses=frozenset({429, 500, 501, 503, 504, 505}),
        ),
        RetrySchedule((0,), statuses=frozenset({404})),
    ],
)
def test_a_schedule_reads_back_from_its_message(schedule: RetrySchedule) -> None:
    sent = json.loads(json.dumps(schedule.to_dict()))
    assert RetrySchedule.from_dict(sent) == schedule
    # Read once per worker process: the same schedule again is the same object.
    assert RetrySchedule.from_dict(json.loads(json.dumps(sent))) is RetrySchedule.from_dict(sent)


def test_the_default_schedule_sends_its_server_errors_as_one_range() -> None:
    sent = RetrySchedule().to_dict()
    assert sent["statuses"] == [408, 425, 429, "500-599"]
    assert len(json.dumps(sent)) < 200
    # A message of an earlier version, every status listed, reads the same.
    listed = {**sent, "statuses": sorted(RetrySchedule().statuses)}
    assert RetrySchedule.from_dict(listed) == RetrySchedule()


@pytest.mark.parametrize(
    "statuses", [["599-500"], ["500-"], ["400-99999999999"], ["200-299"], [[500]], "500-599"]
)
def test_an_unreadable_status_range_is_a_usage_error(statuses: object) -> None:
    sent = {**RetrySchedule().to_dict(), "statuses": statuses}
    with pytest.raises(UsageError):
        RetrySchedule.from_dict(sent)


def test_schedule_settings_need_the_celery_executor() -> None:
    with pytest.raises(UsageError, match="executor 'celery'"):
        Dispatcher(executor="threads", retry_schedule=[1])


def test_a_broker_that_is_not_redis_needs_a_ledger_url() -> None:
    amqp = "amqp://guest:secret@127.0.0.1:5672//"
    with (
        Dispatcher(executor="celery", celery_broker=amqp) as d,
        pytest.raises(UsageError, match="delivery_redis") as info,
    ):
        d.submit("http://127.0.0.1:9/")
    assert "secret" not in str(info.value)
    with Dispatcher(executor="celery", celery_broker=amqp, retry_schedule=None) as d:
        assert d._get_executor() is not None  # without a schedule, no ledger is needed
    with pytest.raises(UsageError, match="delivery_redis"):
        WorkerConfig.from_settings(amqp, {})
    assert WorkerConfig.from_settings(amqp, {"delivery_redis": REDIS_URL}).ledger_url == REDIS_URL


def test_a_worker_config_shows_no_secret() -> None:
    config = WorkerConfig.from_settings(
        "redis://:brokerpass@127.0.0.1:6379/0",
        {
            "signing_secret": "whsec_" + "c2VjcmV0c2VjcmV0c2VjcmV0",
            "delivery_redis": "redis://:ledgerpass@127.0.0.1/1",
        },
    )
    shown = repr(config)
    for secret in ("brokerpass", "ledgerpass", "c2VjcmV0c2VjcmV0c2VjcmV0"):
        assert secret not in shown
    assert "127.0.0.1:6379" in shown


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"timeout": 10, "visibility_timeout": 60}, "visibility timeout"),
        ({"deadline": 70}, "visibility timeout"),
        ({"retry_attempts": 3}, "retry_attempts"),
        ({"retry_schedule": [1]}, "retry_schedule"),
        ({"visibility_timeout": 0}, "visibility_timeout"),
        ({"delivery_poll_interval": "1"}, "delivery_poll_interval"),
        ({"delivery_redis": "http://127.0.0.1/"}, "delivery_redis"),
        ({"timeout": -1}, "timeout"),
        ({"chunk_runner": "trio"}, "chunk_runner"),
        ({"chunk_runner": None}, "chunk_runner"),
        ({"disable": "retry"}, "'disable' takes a list of plugin names, got 'retry'"),
        ({"disable": [5]}, r"'disable' takes plugin names \(str\), got 5"),
    ],
)
def test_bad_worker_settings_are_usage_errors(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        WorkerConfig.from_settings(REDIS_URL, settings).check()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"celery_queue": 5}, "setting 'celery_queue' must be a non-empty str, got 5"),
        ({"celery_queue": ""}, "setting 'celery_queue' must be a non-empty str, got ''"),
        ({"celery_broker": 5}, "setting 'celery_broker' must be a non-empty str, got 5"),
        ({"celery_backend": b"redis://"}, "setting 'celery_backend' must be a non-empty str"),
        ({"celery_get_timeout": "60"}, "celery_get_timeout must be a number of seconds"),
        ({"celery_get_timeout": 0}, "celery_get_timeout must be positive and finite"),
    ],
)
def test_bad_celery_settings_are_usage_errors(settings: dict[str, Any], message: str) -> None:
    settings.setdefault("celery_broker", REDIS_URL)
    with pytest.raises(UsageError, match=re.escape(message)):
        Dispatcher(executor="celery", **settings)


def test_a_worker_with_bad_settings_refuses_to_start() -> None:
    env = {**os.environ, "DISPATCHKIT_CELERY_WORKER_SETTINGS": json.dumps({"deadline": 600})}
    env["DISPATCHKIT_CELERY_BROKER"] = REDIS_URL
    done = subprocess.run(
        [sys.executable, "-c", "import dispatchkit_celery.worker"],
        env=env, capture_output=True, text=True, timeout=PATIENCE, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "UsageError" in done.stderr
    assert "visibility timeout" in done.stderr


def test_a_message_shows_its_call_without_its_secrets(redis_url: str, db: redis.Redis) -> None:
    """What Celery's events, Flower and ``celery inspect`` show of a message (its
    ``argsrepr``) is the method and the masked URL, never the arguments or headers."""
    import base64

    queue = f"dispatchkit-nobody-{uuid.uuid4().hex[:8]}"  # no worker: the message stays
    url = "http://user:pa55word@127.0.0.1:9/hook?token=t0ken&page=2"
    with Dispatcher(executor="celery", celery_broker=redis_url, celery_queue=queue) as d:
        d.apply_async(
            url, "POST", {"card": "4111-1111"}, headers={"Authorization": "Bearer s3cret"}
        )
        d.submit_many(url, [{"card": "4111-2222"}] * 3, "POST")
    messages = [json.loads(raw) for raw in db.lrange(queue, 0, -1)]
    db.delete(queue)
    assert len(messages) == 2
    shown = [(m["headers"]["argsrepr"], m["headers"]["kwargsrepr"]) for m in messages]
    for argsrepr, kwargsrepr in shown:
        assert "127.0.0.1:9/hook" in argsrepr
        assert "POST" in argsrepr
        assert "'attempt': 1" in kwargsrepr
        for secret in ("pa55word", "t0ken", "4111", "s3cret"):
            assert secret not in argsrepr + kwargsrepr
    assert any("3 calls" in argsrepr for argsrepr, _ in shown)
    # The message itself carries the whole call, for the worker.
    bodies = [base64.b64decode(m["body"]) for m in messages]
    assert all(b"4111-" in body for body in bodies)
