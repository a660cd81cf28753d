"""The caller's side: send calls to Celery, read their results from the backend."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import celery.exceptions
import redis
from celery import Celery
from celery.result import AsyncResult as CeleryAsyncResult

from dispatchkit import Call, DispatchError, ResultTimeout, UsageError, states
from dispatchkit._redact import mask_url
from dispatchkit.exceptions import error_from_dict
from dispatchkit_celery._app import make_app
from dispatchkit_celery._config import DEFAULT_QUEUE, QUEUE_ENV, is_redis
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery._schedule import RetrySchedule
from dispatchkit_celery._wire import TASK_NAME, CarriedError, Waiting, message_kwargs

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
    """A call running on Celery, with the interface of ``dispatchkit.AsyncResult``."""

    __slots__ = ("_default_timeout", "_result")

    def __init__(self, result: CeleryAsyncResult, default_timeout: float) -> None:
        self._result = result
        self._default_timeout = default_timeout

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

        A broker with no worker would otherwise make ``get()`` wait forever.
        """
        wait = self._default_timeout if timeout is None else timeout
        try:
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
    follow the schedule of the caller that submitted the call.
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
    ) -> None:
        if app is not None and not isinstance(app, Celery):
            raise UsageError(f"setting 'celery_app' must be a Celery app, got {app!r}")
        self._own_app = app is None
        self.app = app if app is not None else make_app(broker, backend)
        self.queue = queue or os.environ.get(QUEUE_ENV) or DEFAULT_QUEUE
        self._get_timeout = float(get_timeout)
        self._schedule = retries.to_dict() if retries is not None else None
        self._resend_after = retries.resend_after if retries is not None else 0.0
        self._ledger = None if retries is None else Ledger(ledger_url(self.app, delivery_redis))

    def submit(self, call: Call) -> CeleryResult:
        data, ledger, schedule = call.to_dict(), self._ledger, self._schedule
        if ledger is not None and schedule is not None:
            # In the ledger first: if the message is lost on its way, it is sent again.
            ledger.enqueue(call.task_id, data, schedule, self.queue, self._resend_after)
        try:
            result = self.app.send_task(
                TASK_NAME,
                args=[data],
                kwargs=message_kwargs(1, schedule),
                task_id=call.task_id,
                queue=self.queue,
            )
        except BaseException:
            if ledger is not None:
                with contextlib.suppress(redis.RedisError):
                    ledger.forget(call.task_id)  # the caller gets the error: not sent
            raise
        return CeleryResult(result, self._get_timeout)

    def shutdown(self, wait: bool = True) -> None:
        # Calls already sent are the broker's now: they run whether we wait or not.
        if self._ledger is not None:
            self._ledger.close()
        if self._own_app:
            self.app.close()


def ledger_url(app: Celery, delivery_redis: str | None) -> str:
    """The ledger's Redis: ``delivery_redis``, else the broker if it is Redis."""
    broker = str(app.conf.broker_url or "")
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
        "'delivery_redis' (the workers need the same one), or turn durable retries off "
        "with retry_schedule=None"
    )
