"""The Celery side: one app factory and the one task, ``dispatchkit.http_dispatch``."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from celery import Celery

from dispatchkit import Call, Dispatcher, DispatchError

TASK_NAME = "dispatchkit.http_dispatch"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
BROKER_ENV = "DISPATCHKIT_CELERY_BROKER"
BACKEND_ENV = "DISPATCHKIT_CELERY_BACKEND"
QUEUE_ENV = "DISPATCHKIT_CELERY_QUEUE"
DEFAULT_QUEUE = "dispatchkit"
#: Dispatcher settings of the worker's Dispatcher, as a JSON object.
WORKER_SETTINGS_ENV = "DISPATCHKIT_CELERY_WORKER_SETTINGS"


class CarriedError(Exception):
    """A dispatchkit error on its way from a worker, as JSON in ``args[0]``.

    Celery's JSON serializer keeps only an exception's type name and args; the
    caller's result handle turns this back into the original error, with its
    type, reason and context (see ``dispatchkit.exceptions.error_from_dict``).
    """


def make_app(broker: str | None = None, backend: str | None = None) -> Celery:
    """A Celery app configured for at-least-once HTTP dispatch, JSON only."""
    broker = broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER
    backend = backend or os.environ.get(BACKEND_ENV) or broker
    app = Celery("dispatchkit", broker=broker, backend=backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # At least once: a message is acknowledged after the call, and a worker
        # process that dies mid-call hands its message back to the broker.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_default_queue=os.environ.get(QUEUE_ENV) or DEFAULT_QUEUE,
        broker_connection_retry_on_startup=True,
        result_expires=24 * 3600,
    )
    app.task(name=TASK_NAME, bind=True)(http_dispatch)
    return app


_worker_dispatcher: Dispatcher | None = None
_worker_pid = 0
_lock = threading.Lock()


def worker_dispatcher() -> Dispatcher:
    """The Dispatcher of this worker process: one per process, so its pool is shared by tasks."""
    global _worker_dispatcher, _worker_pid
    with _lock:
        if _worker_dispatcher is None or _worker_pid != os.getpid():
            settings: dict[str, Any] = json.loads(os.environ.get(WORKER_SETTINGS_ENV) or "{}")
            settings["executor"] = "threads"  # a worker runs calls itself, never re-queues them
            _worker_dispatcher, _worker_pid = Dispatcher(**settings), os.getpid()
        return _worker_dispatcher


def http_dispatch(task: Any, call: dict[str, Any]) -> Any:
    """Run one call in the worker; the task id is the call's Idempotency-Key."""
    spec = Call.from_dict({**call, "task_id": call.get("task_id") or task.request.id})
    try:
        return worker_dispatcher().execute(spec)
    except DispatchError as exc:
        raise CarriedError(json.dumps(exc.to_dict())) from None
