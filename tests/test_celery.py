"""The Celery executor plugin with real parts: a Redis broker and prefork worker subprocesses.

Without Redis these tests skip with the reason (and fail in CI, where Redis is promised).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from dispatchkit_celery._executor import CeleryResult
from dispatchkit_celery.testing import REDIS_URL, Worker, celery_worker

from conftest import peer_stats
from dispatchkit import (
    URL,
    ConnectError,
    Dispatcher,
    HTTPStatusError,
    RemoteExecuteError,
    ResultTimeout,
    states,
)
from support.celery_env import redis_db

QUEUE = f"dispatchkit-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_db(REDIS_URL) as url:
        yield url


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Worker]:
    with celery_worker(QUEUE, concurrency=2, url=redis_url) as running:
        yield running


@pytest.fixture
def celery_dispatcher(redis_url: str, worker: Worker) -> Iterator[Dispatcher]:
    with Dispatcher(
        executor="celery", celery_broker=redis_url, celery_queue=QUEUE, celery_get_timeout=60
    ) as d:
        yield d


def test_500_calls_come_back_right(celery_dispatcher: Dispatcher, peer: str) -> None:
    results = [celery_dispatcher.submit(f"{peer}/multiply", x=i, y=3) for i in range(500)]
    assert [r.get(timeout=120) for r in results] == [3 * i for i in range(500)]
    assert all(r.state == states.SUCCESS for r in results)


def test_post_and_the_compat_url(celery_dispatcher: Dispatcher, peer: str) -> None:
    res = URL(f"{peer}/multiply", dispatcher=celery_dispatcher).post_async(x=1, y=2)
    assert res.get(timeout=60) == 2
    echo = celery_dispatcher.apply_async(
        f"{peer}/echo", "POST", {"a": [1, 2]}, task_id="celery-echo-1"
    ).get(timeout=60)
    assert echo["headers"]["idempotency-key"] == "celery-echo-1"
    assert echo["args"] == {"a": ["1", "2"]}


def test_errors_arrive_with_type_and_reason(
    celery_dispatcher: Dispatcher, peer: str, redis_url: str
) -> None:
    failing: Any = celery_dispatcher.apply_async(
        f"{peer}/fail500", "POST", {"reason": "disk full"}, task_id="celery-fail-1"
    )
    with pytest.raises(RemoteExecuteError) as info:
        failing.get(timeout=60)
    error = info.value
    assert (error.reason, error.status, error.task_id, error.method) == (
        "disk full", 500, "celery-fail-1", "POST",
    )  # fmt: skip
    assert failing.failed()
    assert failing.state == states.FAILURE
    assert isinstance(failing.get(timeout=5, propagate=False), RemoteExecuteError)
    assert isinstance(failing.result, RemoteExecuteError)

    with pytest.raises(HTTPStatusError) as http:
        celery_dispatcher.submit(f"{peer}/status/404").get(timeout=60)
    assert http.value.status == 404
    assert http.value.body_excerpt == b"nope 404"

    # A connect error is retried under the durable schedule (tests/test_delivery.py);
    # without one, a worker makes one attempt, never retrying inside itself.
    with (
        Dispatcher(
            executor="celery", celery_broker=redis_url, celery_queue=QUEUE, retry_schedule=None
        ) as once,
        pytest.raises(ConnectError),
    ):
        once.submit("http://127.0.0.1:9/unreachable").get(timeout=60)


def test_get_with_a_timeout(celery_dispatcher: Dispatcher, peer: str) -> None:
    res = celery_dispatcher.submit(f"{peer}/slow", delay=1500)
    with pytest.raises(ResultTimeout):
        res.get(timeout=0.1)
    assert res.get(timeout=60) == 1500


def test_waiting_for_results_subscribes_to_nothing(
    celery_dispatcher: Dispatcher, peer: str, redis_url: str
) -> None:
    """get() reads each result from the backend: no result channel is subscribed to, not
    even while it waits, so a caller that stops waiting leaves nothing behind to drain."""
    import redis

    def subscribed(ids: set[str]) -> set[str]:
        found = {str(c) for c in client.pubsub_channels("celery-task-meta-*")}
        return {c for c in found if c.removeprefix("celery-task-meta-") in ids}

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    single = [celery_dispatcher.submit(f"{peer}/multiply", x=i, y=2) for i in range(20)]
    many = celery_dispatcher.submit_many(f"{peer}/multiply", [{"x": i, "y": 5} for i in range(30)])
    slow = celery_dispatcher.submit(f"{peer}/slow", delay=1500)
    with ThreadPoolExecutor(1) as waiter:
        waiting = waiter.submit(slow.get, timeout=60)  # waits across many reads
        seen: set[str] = set()
        while not waiting.done():
            seen |= subscribed({slow.id})
            time.sleep(0.05)
        assert waiting.result() == 1500
    assert [r.get(timeout=60) for r in single] == [2 * i for i in range(20)]
    assert [r.get(timeout=60) for r in many] == [5 * i for i in range(30)]
    seen |= subscribed({r.id for r in [*single, *many]})
    client.close()
    assert seen == set()


def test_get_returns_what_celerys_own_get_returns(celery_dispatcher: Dispatcher, peer: str) -> None:
    """get() takes a success's retval from its own read of the backend: the same value
    Celery's AsyncResult.get() gives, for every JSON shape; a failure goes through Celery's."""
    shapes: list[dict[str, Any]] = [
        {"x": 6, "y": 7},
        {"a": ["1", "2"], "nested": "é ü"},
    ]
    results: list[Any] = [
        celery_dispatcher.apply_async(f"{peer}/echo", "POST", kw) for kw in shapes
    ]
    results.append(celery_dispatcher.submit(f"{peer}/multiply", x=3, y=3))
    results += celery_dispatcher.submit_many(f"{peer}/echo", shapes)
    for r in results:
        ours = r.get(timeout=60)
        theirs = r.celery_result.get(timeout=60, disable_sync_subtasks=False)
        assert ours == theirs
        assert type(ours) is type(theirs)
    failed = celery_dispatcher.submit(f"{peer}/status/404")
    with pytest.raises(HTTPStatusError):
        failed.get(timeout=60)


def test_a_failed_call_is_read_without_subscribing(
    celery_dispatcher: Dispatcher, peer: str, redis_url: str
) -> None:
    """get() of a call that failed raises its error from the state it read: Celery's own
    get() of a result it has not read yet subscribes to the result's channel first (the
    server counts the SUBSCRIBE commands)."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def subscribes() -> int:
        stats = client.info("commandstats").get("cmdstat_subscribe") or {}
        return int(stats.get("calls", 0))

    failed = [celery_dispatcher.submit(f"{peer}/status/404") for _ in range(3)]
    before = subscribes()
    for result in failed:
        with pytest.raises(HTTPStatusError):
            result.get(timeout=60)
    ours = subscribes() - before
    # The same ended calls through Celery's own handles: the count the test can tell from.
    for result in failed:
        assert isinstance(result, CeleryResult)
        fresh = result.celery_result.app.AsyncResult(result.id)  # nothing read into it yet
        error = fresh.get(timeout=60, propagate=False, disable_sync_subtasks=False)
        assert isinstance(error, Exception)
    theirs = subscribes() - before - ours
    client.close()
    assert (ours, theirs > 0) == (0, True)


def test_connections_are_pooled_per_worker_process(
    celery_dispatcher: Dispatcher, peer: str, worker: Worker
) -> None:
    with Dispatcher(disable=["example"]) as local:
        local.call(f"{peer}/stats/reset")
        results = [celery_dispatcher.submit(f"{peer}/multiply", x=i, y=1) for i in range(200)]
        assert [r.get(timeout=120) for r in results] == list(range(200))
        stats = peer_stats(local, peer)
    assert stats["requests"] == 200 + 1
    # Two worker processes, one Dispatcher each: at most two connections, never 200.
    assert stats["connections"] <= len(worker.children()) <= 2


def test_no_call_is_lost_when_a_worker_process_is_killed(
    redis_url: str, peer: str, make_dispatcher: Any
) -> None:
    queue = f"{QUEUE}-kill"
    local = make_dispatcher(disable=["example"])
    local.call(f"{peer}/seen/reset")
    with celery_worker(queue, concurrency=2, url=redis_url) as worker:
        d = make_dispatcher(
            executor="celery", celery_broker=redis_url, celery_queue=queue, celery_get_timeout=120
        )
        results = [d.submit(f"{peer}/record", delay=100) for _ in range(200)]
        deadline = time.monotonic() + 60
        while len(local.call(f"{peer}/seen")) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Kill a pool process in the middle of a call. A process caught in the
        # millisecond between two calls loses nothing; then try the next one.
        for _ in range(3):
            victims = worker.children()
            assert victims, "the worker has no pool processes"
            os.kill(victims[0], signal.SIGKILL)
            if worker.wait_for("WorkerLostError", timeout=2):
                break
        else:
            pytest.fail("no kill caught a call in flight:\n" + "\n".join(worker.log[-20:]))
        values = [r.get(timeout=120) for r in results]
    assert values == [r.id for r in results]  # every call completed, each with its own key
    seen = local.call(f"{peer}/seen")
    assert set(seen) >= {r.id for r in results}  # the server saw every task id at least once
    # The call that was cut off was delivered again, with the same Idempotency-Key.
    assert any(seen[r.id] >= 2 for r in results), seen


def test_the_gateway_applies_through_the_celery_executor(
    celery_dispatcher: Dispatcher, worker: Worker
) -> None:
    import urllib.parse
    import urllib.request

    import orjson

    from dispatchkit.server import TaskApp

    app = TaskApp(gateway=True, dispatcher=celery_dispatcher)
    ran_in: list[int] = []

    @app.task
    def multiply(x: int, y: int) -> int:
        ran_in.append(os.getpid())
        return x * y

    def get(url: str, data: bytes | None = None) -> Any:
        with urllib.request.urlopen(url, data=data, timeout=10) as answer:
            return orjson.loads(answer.read())

    with app.server(port=0) as server:
        body = urllib.parse.urlencode({"x": 6, "y": 7}).encode()
        applied = get(f"{server.url}/apply/multiply", data=body)
        assert applied["ok"] == "true"
        task_id = applied["task_id"]
        deadline = time.monotonic() + 60
        status = get(f"{server.url}/{task_id}/status")["task"]
        while status["status"] not in ("SUCCESS", "FAILURE") and time.monotonic() < deadline:
            time.sleep(0.05)
            status = get(f"{server.url}/{task_id}/status")["task"]
        assert status == {"id": task_id, "status": "SUCCESS", "result": 42}
        assert get(f"{server.url}/{task_id}/done")["task"]["executed"] is True
    # A Celery worker process made the call back to this server: the task ran here,
    # and the result travelled through the broker's result backend.
    assert ran_in == [os.getpid()]
    executor = celery_dispatcher._get_executor()
    assert executor.app.AsyncResult(task_id).get(timeout=10) == 42  # type: ignore[attr-defined]
    app.close()
