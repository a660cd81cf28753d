"""The worker's side: task ``dispatchkit.http_dispatch``, one attempt per delivery.

An attempt that fails and may be retried is not retried here: the worker
records the wait in the delivery ledger, sets Celery state ``RETRY``, and lets
Celery acknowledge the message (``Ignore``). A poller sends the next attempt
when it is due (see ``_poller.py``), so no worker process waits.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import timedelta
from typing import Any

import celery
import redis
from celery.exceptions import Ignore, Reject

from dispatchkit import Call, Dispatcher, DispatchError
from dispatchkit_celery._config import WorkerConfig, build_dispatcher
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery._schedule import RetrySchedule
from dispatchkit_celery._wire import CarriedError, Waiting

log = logging.getLogger("dispatchkit.celery")

#: How long a done call's ledger record is kept when the app sets no ``result_expires``.
DEFAULT_DONE_TTL = 24 * 3600.0


class _Process:
    """What one worker process builds once: its settings, Dispatcher and ledger."""

    def __init__(self, broker: str) -> None:
        self.pid = os.getpid()
        self.config = WorkerConfig.from_env(broker)
        self._dispatcher: Dispatcher | None = None
        self._ledger: Ledger | None = None
        self._lock = threading.Lock()

    @property
    def dispatcher(self) -> Dispatcher:
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = build_dispatcher(self.config)
            return self._dispatcher

    @property
    def ledger(self) -> Ledger:
        with self._lock:
            if self._ledger is None:
                url = self.config.ledger_url
                assert url is not None  # WorkerConfig refuses a worker without one
                self._ledger = Ledger(url)
            return self._ledger


_process: _Process | None = None
_process_lock = threading.Lock()


def worker_process(app: celery.Celery) -> _Process:
    """The resources of this process; a forked pool process builds its own."""
    global _process
    with _process_lock:
        if _process is None or _process.pid != os.getpid():
            _process = _Process(app.conf.broker_url)
        return _process


class DispatchTask(celery.Task):  # type: ignore[misc]  # Celery ships no type hints
    """Marks a call with a durable schedule as done in the ledger, once its result is stored."""

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: Any,
    ) -> None:
        # Called after the backend stored the result, and never for Ignore (RETRY): a
        # crash before this line repeats the attempt, a crash after it loses nothing.
        if kwargs.get("schedule") is None or status not in ("SUCCESS", "FAILURE"):
            return
        try:
            ledger = worker_process(self.app).ledger
            ledger.finish(task_id, int(kwargs.get("attempt", 1)), _done_ttl(self.app))
        except redis.RedisError as exc:
            log.warning("task %s: cannot record its end in the ledger: %s", task_id, exc)


def http_dispatch(
    task: DispatchTask,
    call: dict[str, Any],
    attempt: int = 1,
    schedule: Any = None,
    token: str = "",
) -> Any:
    """Make attempt ``attempt`` of the call; the task id is its Idempotency-Key."""
    task_id: str = task.request.id
    process = worker_process(task.app)
    try:
        spec = Call.from_dict({**call, "task_id": call.get("task_id") or task_id})
        retries = None if schedule is None else RetrySchedule.from_dict(schedule)
        process.config.check_deadline(spec.timeout)
    except DispatchError as exc:
        raise _carried(exc) from None
    if retries is not None and not _take(process, task_id, attempt, token):
        log.warning(
            "task %s: a copy of attempt %d that is taken or over: dropped", task_id, attempt
        )
        raise Ignore()
    _set_state(task, "STARTED", {"pid": os.getpid(), "hostname": task.request.hostname})
    try:
        return process.dispatcher.execute(spec)
    except DispatchError as exc:
        failure = exc
    wait = None if retries is None else retries.wait_after(attempt, failure)
    if retries is None or wait is None:
        if retries is not None:
            log.info("task %s: attempt %d failed for good: %s", task_id, attempt, failure)
        raise _carried(failure)
    _schedule_next(task, process, spec, retries, attempt + 1, time.time() + wait, failure)
    raise Ignore()


def _schedule_next(
    task: DispatchTask,
    process: _Process,
    spec: Call,
    retries: RetrySchedule,
    attempt: int,
    due: float,
    error: DispatchError,
) -> None:
    """Make the next attempt durable before the message of this one is acknowledged.

    ``RETRY`` is written first: once the ledger holds the call, the next attempt
    may start (and write its own state) at any moment.
    """
    task_id: str = task.request.id
    _set_state(task, "RETRY", Waiting(due, attempt))
    delivered_to = (task.request.delivery_info or {}).get("routing_key")
    queue = delivered_to or task.app.conf.task_default_queue
    try:
        process.ledger.wait(
            task_id, spec.to_dict(), retries.to_dict(), queue, attempt, due, error.to_dict()
        )
    except redis.RedisError as exc:
        # Not acknowledged: the broker delivers this attempt again. Repeated, never lost.
        log.error("task %s: the ledger is unreachable (%s): attempt handed back", task_id, exc)
        raise Reject(str(exc), requeue=True) from None
    log.info(
        "task %s: %s; attempt %d of %d due in %.1fs",
        task_id, type(error).__name__, attempt, retries.attempts, due - time.time(),
    )  # fmt: skip


def _take(process: _Process, task_id: str, attempt: int, token: str) -> bool:
    try:
        return process.ledger.take(task_id, attempt, token)
    except redis.RedisError as exc:
        # Without the ledger, running the attempt is the safe side (at least once).
        log.warning("task %s: cannot read the ledger (%s): attempt runs", task_id, exc)
        return True


def _set_state(task: DispatchTask, state: str, meta: Any) -> None:
    """Show ``state`` in the result backend; the ledger, not the state, keeps the call."""
    try:
        task.update_state(state=state, meta=meta)
    except Exception as exc:  # any backend's error: a state is worth less than the call
        log.warning("task %s: cannot store state %s: %s", task.request.id, state, exc)


def _carried(exc: DispatchError) -> CarriedError:
    return CarriedError(json.dumps(exc.to_dict()))


def _done_ttl(app: celery.Celery) -> float:
    expires = app.conf.result_expires
    if isinstance(expires, timedelta):
        return expires.total_seconds()
    return float(expires) if expires else DEFAULT_DONE_TTL
