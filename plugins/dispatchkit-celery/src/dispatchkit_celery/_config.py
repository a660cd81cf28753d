"""Where things are and how long they may take: environment variables and worker settings.

A worker reads ``DISPATCHKIT_CELERY_WORKER_SETTINGS``, one JSON object: the
settings of its own Dispatcher (``timeout``, ``deadline``, ``pool_maxsize``,
TLS, ``disable``, ...) and the worker's delivery settings below, which are
not Dispatcher settings and are taken out before the Dispatcher is built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from dispatchkit import AsyncDispatcher, Dispatcher, Settings, UsageError, mask_url
from dispatchkit._checks import seconds
from dispatchkit.builtin.transport import DEADLINE_FACTOR
from dispatchkit_celery._schedule import RETRY_SETTINGS

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
BROKER_ENV = "DISPATCHKIT_CELERY_BROKER"
BACKEND_ENV = "DISPATCHKIT_CELERY_BACKEND"
QUEUE_ENV = "DISPATCHKIT_CELERY_QUEUE"
#: The caller's ``delivery_redis``, when the setting is not given (for ``dispatchkit`` commands).
DELIVERY_REDIS_ENV = "DISPATCHKIT_DELIVERY_REDIS"
DEFAULT_QUEUE = "dispatchkit"
#: Calls per message of ``submit_many`` (``celery_batch_size``), and the most allowed.
DEFAULT_BATCH_SIZE = 100
MAX_BATCH_SIZE = 10_000
#: The worker's settings, as a JSON object (see the module docstring).
WORKER_SETTINGS_ENV = "DISPATCHKIT_CELERY_WORKER_SETTINGS"

#: Seconds a delivered message may stay unacknowledged before Redis hands it to another
#: worker: the bound on recovering an attempt cut off by a crash.
DEFAULT_VISIBILITY_TIMEOUT = 90.0
#: The longest attempt must fit this many times under the visibility timeout: the rest
#: covers the wait for a pool process, the ledger and state writes, and the ack.
HEADROOM = 1.5
REDIS_SCHEMES = frozenset({"redis", "rediss"})
#: Retry settings of the core that a worker's Dispatcher never uses: one attempt per delivery.
IN_PROCESS_RETRY = ("retry_attempts", "retry_max_time", "retry_backoff", "retry_after_cap")
#: Worker settings that are the worker's own, not its Dispatcher's.
WORKER_ONLY = frozenset({"delivery_redis", "visibility_timeout", "delivery_poll_interval",
                         "delivery_claim_lease", "attempts_ttl", "dead_letter_ttl",
                         "endpoint_wait", "chunk_runner", "chunk_concurrency"})  # fmt: skip
#: Seconds the records of a call's attempts are kept after its last attempt: 7 days.
DEFAULT_ATTEMPTS_TTL = 7 * 24 * 3600.0
#: Seconds a dead letter is kept unless replayed or purged first: 30 days.
DEFAULT_DEAD_LETTER_TTL = 30 * 24 * 3600.0
#: Endpoint isolation on the Celery executor, unless the settings say otherwise: every
#: origin gets a circuit breaker, and a 410 Gone disables its URL (off in-process).
ENDPOINT_DEFAULTS: Mapping[str, Any] = {"circuit_breaker": True, "disable_on_gone": True}
#: How a worker process runs a chunk's calls: on an event loop with the AsyncDispatcher
#: (needs ``dispatchkit[async]``; without it, threads), or on ``pool_maxsize`` threads.
CHUNK_RUNNERS = ("asyncio", "threads")
#: On the event loop: calls of a chunk in flight at once, whatever their origins (each
#: origin's calls are held at ``pool_maxsize`` before their attempt starts).
DEFAULT_CHUNK_CONCURRENCY = 100
MAX_CHUNK_CONCURRENCY = 1000
#: Seconds a worker process waits for a rate limit's token or an in-flight slot before it
#: defers the call through the delivery ledger (a call with a durable schedule).
DEFAULT_ENDPOINT_WAIT = 1.0


def checked_batch_size(value: Any) -> int:
    """``celery_batch_size``, checked: calls per message of ``submit_many``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_SIZE:
        raise UsageError(
            f"setting 'celery_batch_size' must be a whole number from 1 to {MAX_BATCH_SIZE}, "
            f"got {value!r}"
        )
    return value


def restore_interval(visibility_timeout: float) -> int:
    """Seconds between kombu's sweeps for messages past the visibility timeout (1 to 5)."""
    return max(1, min(5, int(visibility_timeout // 10)))


def broker_url(broker: str | None = None) -> str:
    return broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER


def is_redis(url: str) -> bool:
    return urlsplit(url).scheme.lower() in REDIS_SCHEMES


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """A worker's settings, checked: see ``docs/distributed.md`` for each one."""

    broker: str
    #: The worker's Dispatcher settings (without the keys below).
    dispatcher: Mapping[str, Any] = field(default_factory=dict)
    #: The Redis of the delivery ledger; ``None``: the broker's, which must then be Redis.
    delivery_redis: str | None = None
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    #: Seconds between two looks of the poller for due calls.
    delivery_poll_interval: float = 1.0
    #: Seconds a poller owns the calls it claimed: after that, another poller sends them.
    delivery_claim_lease: float = 30.0
    #: Seconds the records of a call's attempts are kept after its last attempt.
    attempts_ttl: float = DEFAULT_ATTEMPTS_TTL
    #: Seconds a dead letter is kept; ``None``: until it is replayed or purged.
    dead_letter_ttl: float | None = DEFAULT_DEAD_LETTER_TTL
    #: Seconds an attempt may wait in the worker process for a slot at its origin (rate
    #: limit, origin_concurrency); past that the call is deferred, no attempt spent.
    endpoint_wait: float = DEFAULT_ENDPOINT_WAIT
    #: How a chunk's calls run: one of :data:`CHUNK_RUNNERS`.
    chunk_runner: str = "asyncio"
    #: On the event loop, calls of a chunk in flight at once over all their origins.
    chunk_concurrency: int = DEFAULT_CHUNK_CONCURRENCY
    #: The core settings of ``dispatcher``, checked.
    core: Settings = field(init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        # Never the raw settings (a signing secret) nor a URL's password: the checked
        # settings mask their secrets, and the URLs are masked here.
        ledger = None if self.delivery_redis is None else mask_url(self.delivery_redis)
        return (
            f"WorkerConfig(broker={mask_url(self.broker)!r}, delivery_redis={ledger!r}, "
            f"visibility_timeout={self.visibility_timeout!r}, core={self.core!r})"
        )

    @classmethod
    def from_env(cls, broker: str | None = None) -> WorkerConfig:
        raw = os.environ.get(WORKER_SETTINGS_ENV) or "{}"
        try:
            settings = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"{WORKER_SETTINGS_ENV} is not JSON: {exc}") from None
        if not isinstance(settings, dict):
            raise UsageError(f"{WORKER_SETTINGS_ENV} must be a JSON object, got {raw!r}")
        return cls.from_settings(broker_url(broker), settings)

    @classmethod
    def from_settings(cls, broker: str, settings: Mapping[str, Any]) -> WorkerConfig:
        """Split ``settings`` into the Dispatcher's and the worker's own; check both."""
        for name in (*IN_PROCESS_RETRY, *RETRY_SETTINGS):
            if name in settings:
                raise UsageError(
                    f"worker setting {name!r} has no effect: a worker makes one attempt per "
                    "delivery, and retries follow the retry_schedule the caller sent with the call"
                )
        own = {name for name in settings if name in WORKER_ONLY}
        dispatcher = {k: v for k, v in settings.items() if k not in own}
        return cls(broker, dispatcher, **{name: settings[name] for name in own})

    def __post_init__(self) -> None:
        core = {k: v for k, v in self.dispatcher.items() if k != "disable"}
        object.__setattr__(self, "core", Settings.from_kwargs(core))
        for name in ("visibility_timeout", "delivery_poll_interval", "delivery_claim_lease",
                     "attempts_ttl", "endpoint_wait"):  # fmt: skip
            seconds(getattr(self, name), f"worker setting {name!r}")
        if self.dead_letter_ttl is not None:
            seconds(self.dead_letter_ttl, "worker setting 'dead_letter_ttl'")
        if self.chunk_runner not in CHUNK_RUNNERS:
            raise UsageError(
                f"worker setting 'chunk_runner' must be one of {', '.join(CHUNK_RUNNERS)}, "
                f"got {self.chunk_runner!r}"
            )
        concurrency = self.chunk_concurrency
        if (
            isinstance(concurrency, bool)
            or not isinstance(concurrency, int)
            or not 1 <= concurrency <= MAX_CHUNK_CONCURRENCY
        ):
            raise UsageError(
                "worker setting 'chunk_concurrency' must be a whole number from 1 to "
                f"{MAX_CHUNK_CONCURRENCY}, got {concurrency!r}"
            )
        if self.delivery_redis is not None and not (
            isinstance(self.delivery_redis, str) and is_redis(self.delivery_redis)
        ):
            raise UsageError(
                "worker setting 'delivery_redis' must be a redis:// or rediss:// URL, "
                f"got {self.delivery_redis!r}"
            )
        if self.ledger_url is None:
            raise UsageError(
                "durable retry schedules keep waiting calls in a Redis ledger, and the broker "
                f"{mask_url(self.broker)!r} is not Redis: give the ledger's URL with the "
                f"worker setting 'delivery_redis' in {WORKER_SETTINGS_ENV}"
            )

    @property
    def ledger_url(self) -> str | None:
        """The Redis of the delivery ledger."""
        if self.delivery_redis is not None:
            return self.delivery_redis
        return self.broker if is_redis(self.broker) else None

    def attempt_deadline(self, timeout: float | None = None) -> float:
        """The longest one attempt takes on this worker (for a call's own ``timeout``)."""
        return self.core.deadline or DEADLINE_FACTOR * (timeout or self.core.timeout)

    def check_deadline(self, timeout: float | None = None) -> None:
        """Refuse an attempt that could outlast the visibility timeout (and run twice)."""
        if not is_redis(self.broker):
            return  # RabbitMQ hands a message back when the connection drops, not on a timer
        deadline = self.attempt_deadline(timeout)
        if deadline * HEADROOM > self.visibility_timeout:
            given = f"a call's timeout of {timeout:g}s" if timeout else "the worker's settings"
            raise UsageError(
                f"{given} allow(s) an attempt of {deadline:g}s, which does not fit "
                f"{HEADROOM:g} times under the visibility timeout of "
                f"{self.visibility_timeout:g}s: an attempt still running then would be "
                "delivered to a second worker. Lower 'timeout' or set 'deadline' "
                f"(at most {self.visibility_timeout / HEADROOM:g}s), or raise "
                "'visibility_timeout' in the worker settings"
            )

    def check(self) -> None:
        """Check what a worker needs before it starts: its Dispatcher builds, its attempts fit."""
        self.check_deadline()
        build_dispatcher(self).close()


def build_dispatcher(config: WorkerConfig) -> Dispatcher:
    """The worker's Dispatcher: its settings, and exactly one attempt per call.

    Its endpoint guard keeps its state in the ledger's Redis (``endpoints_redis``),
    shared by every worker, with :data:`ENDPOINT_DEFAULTS` unless the settings say.
    """
    settings, disable = _worker_settings(config)
    dispatcher = Dispatcher(**settings, executor="threads", disable=disable)
    _one_attempt(dispatcher, dispatcher.close)
    return dispatcher


async def build_async_dispatcher(config: WorkerConfig) -> AsyncDispatcher:
    """:func:`build_dispatcher` for a chunk's event loop (made on that loop): the same
    settings and plugins; a ``UsageError`` names the extra when aiohttp is missing."""
    settings, disable = _worker_settings(config)
    dispatcher = AsyncDispatcher(**settings, disable=disable)
    _one_attempt(dispatcher, lambda: None)
    return dispatcher


def _worker_settings(config: WorkerConfig) -> tuple[dict[str, Any], list[str]]:
    settings = {**ENDPOINT_DEFAULTS, "endpoints_redis": config.ledger_url, **config.dispatcher}
    disable = settings.pop("disable", [])
    if not isinstance(disable, list):  # JSON: a list, or a mistake
        raise UsageError(f"worker setting 'disable' takes a list of plugin names, got {disable!r}")
    return settings, [*disable, "retry"]


def _one_attempt(dispatcher: Dispatcher | AsyncDispatcher, close: Callable[[], None]) -> None:
    retrying = [p.name for p in dispatcher.plugins if "dispatchkit_retry_policy" in p.hooks]
    if retrying:
        close()
        raise UsageError(
            f"plugin(s) {', '.join(map(repr, retrying))} retry inside the worker; a worker makes "
            "one attempt per delivery (retries follow the caller's retry_schedule): disable "
            "them with the worker setting 'disable'"
        )
