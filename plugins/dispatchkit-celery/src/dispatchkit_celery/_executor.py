"""The caller's side: send calls to Celery, read their results from the backend."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import celery.exceptions
import redis
from celery import Celery
from celery import states as celery_states
from celery.result import AsyncResult as CeleryAsyncResult

from dispatchkit import Attempt, Call, DispatchError, ResultTimeout, UsageError, mask_url, states
from dispatchkit.exceptions import error_from_dict
from dispatchkit_celery._app import make_app
from dispatchkit_celery._config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_QUEUE,
    DELIVERY_REDIS_ENV,
    QUEUE_ENV,
    checked_batch_size,
    is_redis,
)
from dispatchkit_celery._dead_letters import DeadLetters, ledger_errors
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery._results import ReadAhead, lean, read_meta
from dispatchkit_celery._schedule import RetrySchedule
from dispatchkit_celery._wire import CarriedError, Waiting, send_call, send_chunk

#: CeleryResult.get() reads a call's state this long after the first read found it running,
#: then twice as long each time, up to MAX_POLL seconds between reads.
FIRST_POLL = 0.002
MAX_POLL = 0.05

# Celery has more states than dispatchkit; the extra ones map to the nearest.
_STATES = {
    "PENDING": states.PENDING,
    "RECEIVED": states.PENDING,
    "STARTED": states.STARTED,
    "RETRY": states.RETRY,
    "SUCCESS": states.SUCCESS,
    "FAILURE": states.FAILURE,
    "REVOKED": states.FAILURE,
    "REJECTED": states.FAILURE,
}


def _original(error: BaseException) -> BaseException:
    """The dispatchkit error a worker raised, rebuilt from what Celery carried."""
    if isinstance(error, CarriedError) and error.args:
        try:
            return error_from_dict(json.loads(error.args[0]))
        except (TypeError, ValueError):
            return DispatchError(f"unreadable error from a worker: {error.args[0]!r}")
    return error


class CeleryResult:
    """A call running on Celery, with the interface of ``dispatchkit.AsyncResult``.

    ``ledger`` gives the delivery ledger where the workers record each attempt.
    """

    __slots__ = ("_batch", "_default_timeout", "_ledger", "_result")

    def __init__(
        self,
        result: CeleryAsyncResult,
        default_timeout: float,
        ledger: Callable[[], Ledger] | None = None,
        batch: ReadAhead | None = None,
    ) -> None:
        self._result = result
        self._default_timeout = default_timeout
        self._ledger = ledger
        self._batch = batch  # the results submitted with this one, read ahead together

    @property
    def id(self) -> str:
        return str(self._result.id)

    @property
    def celery_result(self) -> CeleryAsyncResult:
        """Celery's own handle, for Celery's tools (revoke, forget, ...)."""
        return self._result

    @property
    def state(self) -> str:
        return _STATES.get(self._result.state, states.PENDING)

    @property
    def attempts(self) -> tuple[Attempt, ...]:
        """The records of the call's attempts so far, oldest first, read from the ledger.

        Also while the call waits in ``RETRY``; once the call is ready, every attempt
        is there. A replayed call's old attempts come first.
        """
        if self._ledger is None:
            raise UsageError(f"the attempts of task {self.id} are in a ledger this handle lacks")
        return read_attempts(self._ledger, self.id)

    @property
    def due(self) -> float | None:
        """While ``RETRY``: when the next attempt is due, in unix seconds; else ``None``."""
        meta = self._result.backend.get_task_meta(self._result.id)
        waiting = meta.get("result")
        if meta.get("status") == "RETRY" and isinstance(waiting, Waiting):
            return waiting.due
        return None

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the retval; without ``timeout``, at most ``celery_get_timeout`` seconds.

        A broker with no worker would otherwise make ``get()`` wait forever. The
        state is read from the backend (``get_task_meta``, one read each time, a
        success parsed with less work: ``read_meta``),
        every :data:`FIRST_POLL` seconds at first, then twice as long each time
        up to :data:`MAX_POLL`, as Celery itself polls backends that cannot
        push: nothing subscribes to the result, so nothing is left to drain when
        the caller stops waiting, and a fan-out's thousands of results cost one
        read each once they are in. The handles of one ``submit_many`` (or
        ``submit_calls``) read theirs together (``ReadAhead``): the first read
        of one asks for the next ones too, in one round trip. A success's retval
        is the read's; any other end goes through Celery's ``AsyncResult.get``
        for its error.
        """
        wait = self._default_timeout if timeout is None else timeout
        try:
            meta = self._wait(wait)
            if meta.get("status") == celery_states.SUCCESS:
                return meta.get("result")
            # ready() reads the ended state into Celery's handle, whose get() then raises
            # its error from there, without subscribing to the result's channel.
            self._result.ready()
            return self._result.get(timeout=wait, propagate=True, disable_sync_subtasks=False)
        except celery.exceptions.TimeoutError:
            raise ResultTimeout(
                f"task {self.id} did not finish within {wait}s; it is {self.state} on Celery"
            ) from None
        except Exception as exc:
            error = _original(exc)
            if propagate:
                raise error from None
            return error

    def _wait(self, wait: float) -> dict[str, Any]:
        """The call's meta once it is ready; Celery's ``TimeoutError`` after ``wait`` seconds."""
        backend = self._result.backend
        deadline = time.monotonic() + wait
        pause = FIRST_POLL
        meta = None if self._batch is None else self._batch.meta(self.id)
        while True:
            if meta is None:
                meta = read_meta(backend, self.id)
            if meta.get("status") in backend.READY_STATES:
                return meta
            left = deadline - time.monotonic()
            if left <= 0:
                raise celery.exceptions.TimeoutError(self.id)
            time.sleep(min(pause, left))
            pause = min(pause * 2, MAX_POLL)
            meta = None

    @property
    def result(self) -> Any:
        """The retval, or the error of a failed call; ``None`` while not ready."""
        if not self._result.ready():
            return None
        value = self._result.result
        return _original(value) if isinstance(value, BaseException) else value

    @property
    def traceback(self) -> str | None:
        trace = self._result.traceback
        return str(trace) if trace else None

    def __repr__(self) -> str:
        return f"<CeleryResult {self.id} {self.state}>"


class CeleryExecutor:
    """Sends each call as a ``dispatchkit.http_dispatch`` message; its id is the task id.

    ``retries`` (``None``: one attempt) travels in the message: the workers
    follow the schedule of the caller that submitted the call. :meth:`submit_many`
    sends up to ``batch_size`` calls per ``dispatchkit.http_dispatch_batch`` message.
    """

    def __init__(
        self,
        app: Celery | None = None,
        broker: str | None = None,
        backend: str | None = None,
        queue: str | None = None,
        get_timeout: float = 300.0,
        retries: RetrySchedule | None = None,
        delivery_redis: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.batch_size = checked_batch_size(batch_size)
        if app is not None and not isinstance(app, Celery):
            raise UsageError(f"setting 'celery_app' must be a Celery app, got {app!r}")
        self._own_app = app is None
        self.app = app if app is not None else make_app(broker, backend)
        self.queue = queue or os.environ.get(QUEUE_ENV) or DEFAULT_QUEUE
        self._get_timeout = float(get_timeout)
        self._schedule = retries.to_dict() if retries is not None else None
        self._resend_after = retries.resend_after if retries is not None else 0.0
        self._delivery_redis = delivery_redis
        self._lock = threading.Lock()
        self._ledger = None if retries is None else Ledger(ledger_url(self.app, delivery_redis))
        self._dead_letters: DeadLetters | None = None
        self._closed = False

    def submit(self, call: Call) -> CeleryResult:
        data, ledger, schedule = call.to_dict(), self._ledger, self._schedule
        if ledger is not None and schedule is not None:
            # In the ledger first: if the message is lost on its way, it is sent again.
            ledger.enqueue(call.task_id, data, schedule, self.queue, self._resend_after)
        try:
            send_call(self.app, data, 1, schedule, task_id=call.task_id, queue=self.queue)
        except BaseException:
            if ledger is not None:
                with contextlib.suppress(redis.RedisError):
                    ledger.forget(call.task_id)  # the caller gets the error: not sent
            raise
        return self.result(call.task_id)

    def submit_many(self, calls: Sequence[Call]) -> list[CeleryResult]:
        """Send ``calls`` in chunks of ``batch_size``, one message each; their handles, in order.

        Each chunk's calls are recorded in the ledger first, in one round trip, as
        :meth:`submit` records one. An error while sending a chunk is raised: the
        chunks before it were sent, this one and those after it were not.
        """
        ledger, schedule = self._ledger, self._schedule
        backend = self.app.backend
        batch = ReadAhead(backend, [call.task_id for call in calls]) if lean(backend) else None
        results: list[CeleryResult] = []
        for start in range(0, len(calls), self.batch_size):
            chunk = calls[start : start + self.batch_size]
            data = [call.to_dict() for call in chunk]
            ids = [call.task_id for call in chunk]
            if ledger is not None and schedule is not None:
                ledger.enqueue_many(
                    list(zip(ids, data, strict=True)), schedule, self.queue, self._resend_after
                )
            try:
                send_chunk(self.app, data, schedule, queue=self.queue)
            except BaseException:
                if ledger is not None:
                    with contextlib.suppress(redis.RedisError):
                        ledger.forget_many(ids)  # the caller gets the error: not sent
                raise
            results.extend(self.result(task_id, batch) for task_id in ids)
        return results

    def ledger(self) -> Ledger:
        """The delivery ledger, opened at the first need (a caller without a schedule may lack one).

        A broker that is not Redis, without ``delivery_redis``, is a ``UsageError``.
        """
        with self._lock:
            if self._closed:
                raise UsageError("the Celery executor is shut down (its Dispatcher is closed)")
            if self._ledger is None:
                self._ledger = Ledger(ledger_url(self.app, self._delivery_redis))
            return self._ledger

    def result(self, task_id: str, batch: ReadAhead | None = None) -> CeleryResult:
        """The handle of the call ``task_id`` (sent by any caller on the same broker);
        ``batch``: the results it was submitted with, read ahead together."""
        return CeleryResult(self.app.AsyncResult(task_id), self._get_timeout, self.ledger, batch)

    def attempts(self, task_id: str) -> tuple[Attempt, ...]:
        """The records of the attempts of the call ``task_id``, oldest first (``()``: none)."""
        return read_attempts(self.ledger, task_id)

    @property
    def dead_letters(self) -> DeadLetters:
        """The calls whose schedule ran out: list, look at, replay, purge."""
        with self._lock:
            if self._dead_letters is None:
                self._dead_letters = DeadLetters(self.app, self.ledger, self.result)
            return self._dead_letters

    def shutdown(self, wait: bool = True) -> None:
        # Calls already sent are the broker's now: they run whether we wait or not.
        with self._lock:
            ledger, self._ledger, self._closed = self._ledger, None, True
        if ledger is not None:
            ledger.close()
        if self._own_app:
            self.app.close()


def read_attempts(ledger: Callable[[], Ledger], task_id: str) -> tuple[Attempt, ...]:
    """The records of the call's attempts in ``ledger()``, as ``Attempt`` values."""
    with ledger_errors(f"read the attempts of task {task_id}"):
        records = ledger().attempts(task_id)
    try:
        return tuple(Attempt.from_dict(json.loads(record)) for record in records)
    except ValueError as exc:  # not JSON, or not an attempt (UsageError is a ValueError)
        raise DispatchError(f"task {task_id} has an unreadable attempt record: {exc}") from exc


def ledger_url(app: Celery, delivery_redis: str | None) -> str:
    """The ledger's Redis: ``delivery_redis``, else the broker if it is Redis."""
    broker = str(app.conf.broker_url or "")
    if delivery_redis is None:
        delivery_redis = os.environ.get(DELIVERY_REDIS_ENV) or None
    if delivery_redis is not None:
        if not (isinstance(delivery_redis, str) and is_redis(delivery_redis)):
            raise UsageError(
                "setting 'delivery_redis' must be a redis:// or rediss:// URL, "
                f"got {delivery_redis!r}"
            )
        return delivery_redis
    if is_redis(broker):
        return broker
    raise UsageError(
        "durable retry schedules keep calls in a Redis ledger, and the broker "
        f"{mask_url(broker)!r} is not Redis: give the ledger's URL with the setting "
        f"'delivery_redis' or {DELIVERY_REDIS_ENV} (the workers need the same one), or turn "
        "durable retries off with retry_schedule=None"
    )
