"""The caller's side: send calls to Celery, read their results from the backend."""

from __future__ import annotations

import json
import os
from typing import Any

import celery.exceptions
from celery import Celery
from celery.result import AsyncResult as CeleryAsyncResult

from dispatchkit import Call, DispatchError, ResultTimeout, UsageError, states
from dispatchkit.exceptions import error_from_dict
from dispatchkit_celery._app import DEFAULT_QUEUE, QUEUE_ENV, TASK_NAME, CarriedError, make_app

# Celery has more states than dispatchkit; the extra ones map to the nearest.
_STATES = {
    "PENDING": states.PENDING,
    "RECEIVED": states.PENDING,
    "STARTED": states.STARTED,
    "RETRY": states.STARTED,
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
        value = self._result.result
        return _original(value) if isinstance(value, BaseException) else value

    @property
    def traceback(self) -> str | None:
        trace = self._result.traceback
        return str(trace) if trace else None

    def __repr__(self) -> str:
        return f"<CeleryResult {self.id} {self.state}>"


class CeleryExecutor:
    """Sends each call as one ``dispatchkit.http_dispatch`` message; its id is the task id."""

    def __init__(
        self,
        app: Celery | None = None,
        broker: str | None = None,
        backend: str | None = None,
        queue: str | None = None,
        get_timeout: float = 300.0,
    ) -> None:
        if app is not None and not isinstance(app, Celery):
            raise UsageError(f"setting 'celery_app' must be a Celery app, got {app!r}")
        self._own_app = app is None
        self.app = app if app is not None else make_app(broker, backend)
        self.queue = queue or os.environ.get(QUEUE_ENV) or DEFAULT_QUEUE
        self._get_timeout = float(get_timeout)

    def submit(self, call: Call) -> CeleryResult:
        result = self.app.send_task(
            TASK_NAME, args=[call.to_dict()], task_id=call.task_id, queue=self.queue
        )
        return CeleryResult(result, self._get_timeout)

    def shutdown(self, wait: bool = True) -> None:
        # Calls already sent are the broker's now: they run whether we wait or not.
        if self._own_app:
            self.app.close()
