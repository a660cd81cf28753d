"""The worker's side: task ``dispatchkit.http_dispatch``, one attempt per delivery.

An attempt that fails and may be retried is not retried here: the worker
records the wait in the delivery ledger, sets Celery state ``RETRY``, and lets
Celery acknowledge the message (``Ignore``). A poller sends the next attempt
when it is due (see ``_poller.py``), so no worker process waits.

An attempt the endpoint guard turns away (the origin's breaker is open, or no
slot at it within ``endpoint_wait``) sent nothing: the call goes back into the
ledger, due when the origin takes calls again, with the same attempt number.

Every attempt's record (``dispatchkit.Attempt``) goes into the ledger: with the
wait, or before the result is stored when it was the call's last. A call whose
schedule ran out on failures worth retrying becomes a dead letter
(``_dead_letters.py``) in the same transaction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import celery
import redis
from celery.exceptions import Ignore, Reject

from dispatchkit import Attempt, Call, Dispatcher, DispatchError, EndpointDisabledError
from dispatchkit_celery._config import WorkerConfig, build_dispatcher
from dispatchkit_celery._dead_letters import bury
from dispatchkit_celery._guard import deferrable, deferred_until
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
        # What take() said; a replay that came in meanwhile has its own: left alone.
        offset = getattr(self.request, "dispatchkit_offset", None)
        try:
            ledger = worker_process(self.app).ledger
            ledger.finish(task_id, int(kwargs.get("attempt", 1)), _done_ttl(self.app), offset)
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
    offset: int | None = 0
    if retries is not None:
        offset = _take(process, task_id, attempt, token)
    task.request.dispatchkit_offset = offset
    number = attempt + (offset or 0)  # a replayed call's attempts number on after the old
    _set_state(task, "STARTED", {"pid": os.getpid(), "hostname": task.request.hostname})
    attempts: list[Attempt] = []
    # With a schedule, a long wait for a slot at the origin defers the call instead (before
    # the wait would outlast the call's timeout, a DispatchTimeout that spends an attempt).
    config = process.config
    wait_at_most = min(config.endpoint_wait, spec.timeout or config.core.timeout)
    patience = contextlib.nullcontext() if retries is None else deferrable(wait_at_most)
    try:
        with patience:
            retval = process.dispatcher.execute(spec, attempts=attempts)
    except DispatchError as exc:
        failure = exc
    else:
        _record(task, process, _records(task, attempts, number))
        return retval
    back = None if retries is None else deferred_until(failure, time.time())
    if retries is not None and back is not None:  # nothing was sent: no attempt spent
        _schedule_next(task, process, spec, retries, attempt, back, failure, [])
        raise Ignore()
    records = _records(task, attempts, number)
    wait = None if retries is None else retries.wait_after(attempt, failure)
    if retries is None or wait is None:
        # A disabled URL's call waits as a dead letter, to be replayed once it is enabled.
        gone = isinstance(failure, EndpointDisabledError)
        if retries is not None and (retries.retryable(failure) or gone):
            _bury(task, process, spec, retries, number, failure, records)
        else:
            _record(task, process, records)
            if retries is not None:
                log.info("task %s: attempt %d failed for good: %s", task_id, number, failure)
        raise _carried(failure)
    due = time.time() + wait
    _schedule_next(task, process, spec, retries, attempt + 1, due, failure, records)
    raise Ignore()


def _schedule_next(
    task: DispatchTask,
    process: _Process,
    spec: Call,
    retries: RetrySchedule,
    attempt: int,
    due: float,
    error: DispatchError,
    records: list[dict[str, Any]],
) -> None:
    """Make the next attempt durable before the message of this one is acknowledged.

    ``RETRY`` is written first: once the ledger holds the call, the next attempt
    may start (and write its own state) at any moment.
    """
    task_id: str = task.request.id
    _set_state(task, "RETRY", Waiting(due, attempt))
    config = process.config
    try:
        process.ledger.wait(
            task_id, spec.to_dict(), retries.to_dict(), _queue(task), attempt, due,
            error.to_dict(), records, config.attempts_ttl,
        )  # fmt: skip
    except redis.RedisError as exc:
        # Not acknowledged: the broker delivers this attempt again. Repeated, never lost.
        log.error("task %s: the ledger is unreachable (%s): attempt handed back", task_id, exc)
        raise Reject(str(exc), requeue=True) from None
    log.info(
        "task %s: %s; attempt %d of %d due in %.1fs",
        task_id, type(error).__name__, attempt, retries.attempts, due - time.time(),
    )  # fmt: skip


def _bury(
    task: DispatchTask,
    process: _Process,
    spec: Call,
    retries: RetrySchedule,
    number: int,
    error: DispatchError,
    records: list[dict[str, Any]],
) -> None:
    """Keep the call as a dead letter before its FAILURE is stored: a caller that sees one
    finds the other."""
    task_id: str = task.request.id
    config = process.config
    try:
        bury(
            process.ledger, task_id, spec.to_dict(), retries.to_dict(), _queue(task), number,
            error.to_dict(), records, config.attempts_ttl, config.dead_letter_ttl,
        )  # fmt: skip
    except redis.RedisError as exc:
        # Not acknowledged: the broker delivers this attempt again. Repeated, never lost.
        log.error("task %s: the ledger is unreachable (%s): attempt handed back", task_id, exc)
        raise Reject(str(exc), requeue=True) from None
    log.warning(
        "task %s: %s on attempt %d, the schedule's last: kept as a dead letter",
        task_id, type(error).__name__, number,
    )  # fmt: skip


def _record(task: DispatchTask, process: _Process, records: list[dict[str, Any]]) -> None:
    """Add the records of the call's last attempt, before its result is stored."""
    try:
        process.ledger.record(task.request.id, records, process.config.attempts_ttl)
    except redis.RedisError as exc:  # the records are worth less than the result
        log.warning("task %s: cannot record its attempt in the ledger: %s", task.request.id, exc)


def _records(task: DispatchTask, attempts: list[Attempt], number: int) -> list[dict[str, Any]]:
    """The records of this delivery's attempt (one), numbered in the call, named for the worker.

    ``worker`` is the Celery worker's node name and the pool process: ``name@host:pid``.
    """
    node = task.request.hostname
    return [
        replace(
            attempt,
            number=number + attempt.number - 1,
            worker=f"{node}:{os.getpid()}" if node else attempt.worker,
        ).to_dict()
        for attempt in attempts
    ]


def _queue(task: DispatchTask) -> str:
    """The queue the message came by: the next attempt (or a replay) goes the same way."""
    delivered_to = (task.request.delivery_info or {}).get("routing_key")
    return str(delivered_to or task.app.conf.task_default_queue)


def _take(process: _Process, task_id: str, attempt: int, token: str) -> int | None:
    """The call's offset if this message runs its attempt (``None``: offset unknown).

    A duplicate is dropped here (``Ignore``).
    """
    try:
        offset = process.ledger.take_attempt(task_id, attempt, token)
    except redis.RedisError as exc:
        # Without the ledger, running the attempt is the safe side (at least once).
        log.warning("task %s: cannot read the ledger (%s): attempt runs", task_id, exc)
        return None
    if offset is None:
        log.warning(
            "task %s: a copy of attempt %d that is taken or over: dropped", task_id, attempt
        )
        raise Ignore()
    return offset


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
