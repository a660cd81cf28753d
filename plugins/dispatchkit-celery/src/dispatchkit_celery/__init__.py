"""dispatchkit-celery: an executor plugin that runs calls on Celery workers.

Chosen with ``Dispatcher(executor="celery")`` or ``DISPATCHKIT_EXECUTOR=celery``;
registered through the entry point ``celery`` in the group ``dispatchkit``.
Importing this package imports no Celery: that happens at the first ``submit()``.

Settings (``Dispatcher(celery_broker=..., ...)``, else environment variables):

=========================  ==============================  ===============================
setting                    environment                     default
=========================  ==============================  ===============================
``celery_app``             --                              an app made from the two below
``celery_broker``          ``DISPATCHKIT_CELERY_BROKER``   ``redis://127.0.0.1:6379/0``
``celery_backend``         ``DISPATCHKIT_CELERY_BACKEND``  the broker URL
``celery_queue``           ``DISPATCHKIT_CELERY_QUEUE``    ``dispatchkit``
``celery_get_timeout``     --                              300 seconds
``retry_schedule``         --                              5 s, 5 min, 30 min, 2 h, 5 h,
                                                           10 h, 10 h (``None``: no retry)
``retry_jitter``           --                              0.2 (each wait times 1 ± 0.2)
``retry_after_max``        --                              86400 seconds
``retry_methods``          --                              ``None``: every method
``retry_statuses``         --                              408, 425, 429, 500-599
``delivery_resend_after``  --                              300 seconds
``delivery_redis``         --                              the broker, if it is Redis
=========================  ==============================  ===============================

The ``retry_*`` settings make the durable retry schedule: after a failed
attempt, the call waits in a Redis ledger, not in a worker, and a poller in
the workers sends its next attempt when it is due. They travel with each call,
so workers follow the schedule of the caller that submitted it. Workers have
settings of their own (``delivery_redis``, ``visibility_timeout``, ...) in
``DISPATCHKIT_CELERY_WORKER_SETTINGS``; ``docs/distributed.md`` lists them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dispatchkit import Dispatcher, Settings, UsageError, hookimpl
from dispatchkit_celery._schedule import RETRY_SETTINGS, RetrySchedule

if TYPE_CHECKING:
    from dispatchkit_celery._executor import CeleryExecutor

__all__ = ["CeleryPlugin"]

NAME = "celery"


class CeleryPlugin:
    """Provides the ``celery`` executor."""

    name = NAME

    def __init__(self) -> None:
        self._options: dict[str, Any] = {}

    @hookimpl
    def dispatchkit_configure(self, settings: Settings) -> None:
        extra = settings.extra
        self._options = {
            "app": extra("celery_app"),
            "broker": extra("celery_broker"),
            "backend": extra("celery_backend"),
            "queue": extra("celery_queue"),
            "get_timeout": extra("celery_get_timeout", 300.0),
        }
        if settings.executor != NAME:
            given = [n for n in (*RETRY_SETTINGS, "delivery_redis") if n in settings.extras]
            if given:
                raise UsageError(
                    f"setting {given[0]!r} is for executor 'celery' (this Dispatcher's "
                    f"executor is {settings.executor!r}): retry_attempts and the other core "
                    "retry settings shape retries in this process"
                )
            return
        self._options["retries"] = RetrySchedule.from_settings(extra)
        self._options["delivery_redis"] = extra("delivery_redis")

    @hookimpl
    def dispatchkit_executor(self, dispatcher: Dispatcher) -> CeleryExecutor | None:
        if dispatcher.settings.executor != NAME:
            return None
        from dispatchkit_celery._executor import CeleryExecutor

        return CeleryExecutor(**self._options)
