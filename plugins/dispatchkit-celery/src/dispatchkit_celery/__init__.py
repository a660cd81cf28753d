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
``celery_batch_size``      --                              100 calls per message of
                                                           ``submit_many``
``retry_schedule``         --                              5 s, 5 min, 30 min, 2 h, 5 h,
                                                           10 h, 10 h (``None``: no retry)
``retry_jitter``           --                              0.2 (each wait times 1 ± 0.2)
``retry_after_max``        --                              86400 seconds
``retry_methods``          --                              ``None``: every method
``retry_statuses``         --                              408, 425, 429, 500-599
``delivery_resend_after``  --                              300 seconds
``delivery_redis``         --                              the broker, if it is Redis
``endpoints_redis``        --                              on ``celery``: ``delivery_redis``
=========================  ==============================  ===============================

The ``retry_*`` settings make the durable retry schedule: after a failed
attempt, the call waits in a Redis ledger, not in a worker, and a poller in
the workers sends its next attempt when it is due. They travel with each call,
so workers follow the schedule of the caller that submitted it. Workers have
settings of their own (``delivery_redis``, ``visibility_timeout``, ...) in
``DISPATCHKIT_CELERY_WORKER_SETTINGS``; ``docs/distributed.md`` lists them.

Workers record every attempt in the ledger: ``result.attempts``, or
:func:`attempts` by task id. A call whose schedule ran out is kept as a dead
letter: :func:`dead_letters` lists, replays and purges them (so do the
commands ``dispatchkit attempts`` and ``dispatchkit dead-letters``).

Endpoint isolation (``circuit_breaker``, ``rate_limits``, ``origin_concurrency``,
``disable_on_gone``) is shared through Redis (``endpoints_redis``) by every
worker and every Dispatcher on the ``celery`` executor, with the breaker and
``disable_on_gone`` on by default there; ``dispatchkit endpoints`` shows it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from dispatchkit import Attempt, Dispatcher, Settings, UsageError, hookimpl
from dispatchkit._checks import seconds
from dispatchkit.builtin.endpoints import EndpointPolicy
from dispatchkit_celery._config import (
    DEFAULT_BATCH_SIZE,
    DELIVERY_REDIS_ENV,
    ENDPOINT_DEFAULTS,
    broker_url,
    checked_batch_size,
    is_redis,
)
from dispatchkit_celery._schedule import RETRY_SETTINGS, RetrySchedule

if TYPE_CHECKING:
    from dispatchkit import EndpointGuard
    from dispatchkit_celery._dead_letters import DeadLetters
    from dispatchkit_celery._executor import CeleryExecutor
    from dispatchkit_celery._guard import RedisGuard

__all__ = ["CeleryPlugin", "attempts", "dead_letters"]

NAME = "celery"
_UNSET: Any = object()


def _text(value: Any, name: str) -> str | None:
    """A setting that is a non-empty str, or not given (``None``)."""
    if value is not None and not (isinstance(value, str) and value):
        raise UsageError(f"setting {name!r} must be a non-empty str, got {value!r}")
    return value


class CeleryPlugin:
    """Provides the ``celery`` executor, and the endpoint guard its workers share."""

    name = NAME

    def __init__(self) -> None:
        self._options: dict[str, Any] = {}
        self._shared: str | None = None  # the Redis of the shared endpoint guard
        self._guard: RedisGuard | None = None

    @hookimpl
    def dispatchkit_configure(self, settings: Settings) -> None:
        extra = settings.extra
        self._options = {
            "app": extra("celery_app"),
            "broker": _text(extra("celery_broker"), "celery_broker"),
            "backend": _text(extra("celery_backend"), "celery_backend"),
            "queue": _text(extra("celery_queue"), "celery_queue"),
            "get_timeout": seconds(extra("celery_get_timeout", 300.0), "celery_get_timeout"),
            "batch_size": checked_batch_size(extra("celery_batch_size", DEFAULT_BATCH_SIZE)),
        }
        shared = extra("endpoints_redis", _UNSET)
        if shared not in (_UNSET, None) and not (isinstance(shared, str) and is_redis(shared)):
            raise UsageError(
                f"setting 'endpoints_redis' must be a redis:// or rediss:// URL, got {shared!r}"
            )
        self._shared = None if shared is _UNSET else shared
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
        if shared is _UNSET:
            self._shared = self._workers_redis()

    @hookimpl
    def dispatchkit_endpoint_guard(self, settings: Settings) -> EndpointGuard | None:
        """The guard in Redis, with the Celery defaults on the ``celery`` executor."""
        if self._shared is None:
            return None  # the built-in, in-process guard decides
        defaults = ENDPOINT_DEFAULTS if settings.executor == NAME else {}
        policy = EndpointPolicy.from_settings(settings, **defaults)
        if not policy.active:
            return None
        from dispatchkit_celery._guard import RedisGuard, lease_for

        self._guard = RedisGuard(self._shared, policy, lease=lease_for(settings))
        return self._guard

    @hookimpl
    def dispatchkit_close(self, dispatcher: Dispatcher) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.close()

    def _workers_redis(self) -> str | None:
        """Where the workers keep the ledger and the guard: ``delivery_redis``, else the broker."""
        given = self._options.get("delivery_redis") or os.environ.get(DELIVERY_REDIS_ENV)
        if given:
            return str(given) if is_redis(str(given)) else None
        app = self._options["app"]
        if app is not None:
            broker = str(app.conf.broker_url or "")
        else:
            broker = broker_url(self._options["broker"])
        return broker if is_redis(broker) else None

    @hookimpl
    def dispatchkit_executor(self, dispatcher: Dispatcher) -> CeleryExecutor | None:
        if dispatcher.settings.executor != NAME:
            return None
        from dispatchkit_celery._executor import CeleryExecutor

        return CeleryExecutor(**self._options)


def attempts(dispatcher: Dispatcher, task_id: str) -> tuple[Attempt, ...]:
    """The records of the attempts of the call ``task_id`` on Celery, oldest first.

    Any call sent through the same broker (and delivery ledger), by any process;
    ``()`` when none is recorded (yet, or any more: they are kept ``attempts_ttl``).
    """
    from dispatchkit_celery._dead_letters import checked_task_id

    return _celery_executor(dispatcher).attempts(checked_task_id(task_id))


def dead_letters(dispatcher: Dispatcher) -> DeadLetters:
    """The dead letters of ``dispatcher``'s Celery broker: ``list``, ``get``, ``replay``,
    ``replay_all``, ``purge`` and ``purge_all``."""
    return _celery_executor(dispatcher).dead_letters


def _celery_executor(dispatcher: Dispatcher) -> CeleryExecutor:
    from dispatchkit_celery._executor import CeleryExecutor

    executor = dispatcher._get_executor()
    if not isinstance(executor, CeleryExecutor):
        raise UsageError(
            f"this Dispatcher's executor is {dispatcher.settings.executor!r}: attempts by task "
            "id and dead letters are kept by executor 'celery'"
        )
    return executor
