"""The Celery app: its configuration, its two tasks, and the ledger's poller in workers."""

from __future__ import annotations

import os

from celery import Celery

from dispatchkit_celery._config import (
    BACKEND_ENV,
    DEFAULT_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT,
    QUEUE_ENV,
    broker_url,
    restore_interval,
)
from dispatchkit_celery._poller import PollerStep
from dispatchkit_celery._task import DispatchTask, http_dispatch, http_dispatch_batch
from dispatchkit_celery._wire import BATCH_TASK_NAME, TASK_NAME


def make_app(
    broker: str | None = None,
    backend: str | None = None,
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
) -> Celery:
    """A Celery app configured for at-least-once HTTP dispatch, JSON only.

    ``visibility_timeout`` matters to workers on a Redis broker: a message
    delivered to a worker that died comes back to the queue that many seconds
    after its delivery (kombu looks for such messages every few seconds).
    """
    broker = broker_url(broker)
    backend = backend or os.environ.get(BACKEND_ENV) or broker
    app = Celery("dispatchkit", broker=broker, backend=backend)
    sweep = restore_interval(visibility_timeout)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # At least once: a message is acknowledged after the attempt (or after its
        # next one is recorded in the ledger), and a worker process that dies
        # mid-attempt hands its message back to the broker.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=os.environ.get(QUEUE_ENV) or DEFAULT_QUEUE,
        broker_connection_retry_on_startup=True,
        result_expires=24 * 3600,
        # A worker killed as a whole (main process included) leaves its unacknowledged
        # messages to Redis's visibility timeout: bounded here, and swept for often.
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": sweep,
            "unacked_restore_throttle": 1,
            # A worker killed in the middle of a sweep holds its lock until this expires.
            "unacked_mutex_expire": 2 * sweep,
        },
    )
    # The task writes STARTED itself, once it knows the delivery is not a duplicate.
    app.task(name=TASK_NAME, bind=True, base=DispatchTask, track_started=False)(http_dispatch)
    # A chunk stores each call's result under the call's own id, nothing under its own.
    app.task(name=BATCH_TASK_NAME, bind=True, ignore_result=True, track_started=False)(
        http_dispatch_batch
    )
    app.steps["worker"].add(PollerStep)
    return app
