"""The durable retry schedule: which failures are retried, and how long each wait is.

Sans-IO: plain data that travels in every message of a call (``to_dict`` /
``from_dict``), and two decisions (:meth:`RetrySchedule.retryable`,
:meth:`RetrySchedule.wait_after`) that the worker takes after a failed attempt.
The schedule is a list rather than a tenacity strategy because it must cross
the broker with the call and be read back by whichever worker runs the next
attempt; the ``Retry-After`` parsing is the core's own.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dispatchkit import DispatchError, HTTPStatusError, TransportError, UsageError
from dispatchkit._checks import seconds
from dispatchkit.builtin.retry import parse_retry_after

#: Seconds to wait after each failed attempt: 8 attempts over about 27 hours, close to
#: the schedule Svix runs in production.
DEFAULT_WAITS = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
DEFAULT_JITTER = 0.2
DEFAULT_RETRY_AFTER_MAX = 86400.0
#: Seconds after which a message no worker has taken is sent again.
DEFAULT_RESEND_AFTER = 300.0
#: Request Timeout, Too Early, Too Many Requests, and every server error.
DEFAULT_STATUSES = frozenset({408, 425, 429, *range(500, 600)})
#: The answers whose ``Retry-After`` replaces the schedule's wait.
RETRY_AFTER_STATUSES = frozenset({429, 503})
#: More waits than anyone means: a list this long is a mistake.
MAX_WAITS = 100

#: The settings of the schedule, as ``RetrySchedule.from_settings`` reads them.
RETRY_SETTINGS = (
    "retry_schedule",
    "retry_jitter",
    "retry_after_max",
    "retry_methods",
    "retry_statuses",
    "delivery_resend_after",
)


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """How a call is retried on Celery, each wait outside any worker.

    ``waits[i]`` is the wait after attempt ``i + 1``, so a call has at most
    ``len(waits) + 1`` attempts. Each wait is scaled by a random factor in
    ``1 ± jitter``; a ``Retry-After`` on a 429 or 503 replaces it, up to
    ``retry_after_max`` seconds. ``methods`` (``None``: every method) and
    ``statuses`` narrow what is retried. A message that no worker has taken
    ``resend_after`` seconds after it was sent (lost on its way, or stuck behind a
    long queue) is sent again; the first copy taken runs, the others are dropped.
    """

    waits: tuple[float, ...] = DEFAULT_WAITS
    jitter: float = DEFAULT_JITTER
    retry_after_max: float = DEFAULT_RETRY_AFTER_MAX
    methods: frozenset[str] | None = None
    statuses: frozenset[int] = DEFAULT_STATUSES
    resend_after: float = DEFAULT_RESEND_AFTER

    def __post_init__(self) -> None:
        object.__setattr__(self, "waits", _waits(self.waits))
        jitter = self.jitter
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
            raise UsageError(f"setting 'retry_jitter' must be a fraction in [0, 1), got {jitter!r}")
        seconds(self.retry_after_max, "setting 'retry_after_max'")
        seconds(self.resend_after, "setting 'delivery_resend_after'")
        if self.methods is not None:
            object.__setattr__(self, "methods", _methods(self.methods))
        object.__setattr__(self, "statuses", _statuses(self.statuses))

    @classmethod
    def from_settings(cls, extra: Callable[[str, Any], Any]) -> RetrySchedule | None:
        """The schedule the settings ask for (``settings.extra``); ``None`` when it is off.

        ``retry_schedule=None`` or ``[]`` turns it off; the other settings are checked anyway.
        """
        waits = extra("retry_schedule", DEFAULT_WAITS)
        schedule = cls(
            () if waits is None else waits,
            extra("retry_jitter", DEFAULT_JITTER),
            extra("retry_after_max", DEFAULT_RETRY_AFTER_MAX),
            extra("retry_methods", None),
            extra("retry_statuses", DEFAULT_STATUSES),
            extra("delivery_resend_after", DEFAULT_RESEND_AFTER),
        )
        return schedule if schedule.waits else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the message; :meth:`from_dict` reads it back (and checks it)."""
        return {
            "waits": list(self.waits),
            "jitter": self.jitter,
            "retry_after_max": self.retry_after_max,
            "methods": sorted(self.methods) if self.methods is not None else None,
            "statuses": _runs(self.statuses),
            "resend_after": self.resend_after,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetrySchedule:
        """The schedule of a message (or of the ledger); a ``UsageError`` if unreadable.

        A worker reads the same few schedules in every message, so each is read
        and checked once per process (up to :data:`READ_CACHE` of them).
        """
        try:
            methods, statuses = data["methods"], data["statuses"]
            key = (
                _frozen(data["waits"]),
                data["jitter"],
                data["retry_after_max"],
                None if methods is None else _frozen(methods),
                _frozen(statuses),
                data["resend_after"],
            )
            return _read(key)
        except (KeyError, TypeError) as exc:  # TypeError: unhashable, so not plain JSON
            raise UsageError(f"unreadable retry schedule in the message: {data!r}") from exc

    @property
    def attempts(self) -> int:
        """The most attempts a call makes, the first included."""
        return len(self.waits) + 1

    def retryable(self, error: DispatchError) -> bool:
        """Whether trying again may help: each attempt carries the same Idempotency-Key.

        Connect errors, timeouts and broken connections, and the statuses in
        ``statuses``, for the methods in ``methods``. The task's own failure
        (``RemoteExecuteError``), any other status, an invalid answer, and an
        error nothing was sent for (egress, usage, encoding) are final.
        """
        if self.methods is not None and error.method not in self.methods:
            return False
        if isinstance(error, TransportError):
            return error.transient
        if isinstance(error, HTTPStatusError):
            return error.status in self.statuses
        return False

    def wait_after(
        self, attempt: int, error: DispatchError, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (from 1); ``None``: it was the last."""
        if attempt > len(self.waits) or not self.retryable(error):
            return None
        if isinstance(error, HTTPStatusError) and error.status in RETRY_AFTER_STATUSES:
            asked = parse_retry_after(error.headers.get("retry-after"))
            if asked is not None:
                return min(asked, self.retry_after_max)
        factor = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return self.waits[attempt - 1] * factor


#: How many schedules a process keeps read (a worker sees one per caller's settings).
READ_CACHE = 64


@functools.lru_cache(maxsize=READ_CACHE)
def _read(key: tuple[Any, ...]) -> RetrySchedule:
    waits, jitter, retry_after_max, methods, statuses, resend_after = key
    return RetrySchedule(waits, jitter, retry_after_max, methods, _expanded(statuses), resend_after)


def _frozen(value: Any) -> Any:
    """``value`` (a list from JSON) as a tuple, so that it can be a cache key; else as it is."""
    return tuple(value) if isinstance(value, list) else value


def _runs(statuses: frozenset[int]) -> list[int | str]:
    """``statuses`` sorted, three or more in a row as one ``"first-last"``: the default's
    hundred server errors travel in every message as ``"500-599"``."""
    runs: list[list[int]] = []
    for status in sorted(statuses):
        if runs and status == runs[-1][-1] + 1:
            runs[-1].append(status)
        else:
            runs.append([status])
    listed: list[int | str] = []
    for run in runs:
        listed += [f"{run[0]}-{run[-1]}"] if len(run) >= 3 else run
    return listed


def _expanded(statuses: Any) -> Any:
    """The statuses of :func:`_runs` one by one (anything else as it is, for the checks)."""
    if not isinstance(statuses, (list, tuple)):
        return statuses
    out: list[object] = []
    for item in statuses:
        first, dash, last = item.partition("-") if isinstance(item, str) else ("", "", "")
        if dash and first.isdigit() and last.isdigit() and 400 <= int(first) <= int(last) <= 599:
            out.extend(range(int(first), int(last) + 1))
        else:
            out.append(item)
    return out


def _waits(waits: object) -> tuple[float, ...]:
    if isinstance(waits, (str, bytes)) or not isinstance(waits, Iterable):
        raise UsageError(
            f"setting 'retry_schedule' must be a list of seconds (or None), got {waits!r}"
        )
    listed = list(waits)
    if len(listed) > MAX_WAITS:
        raise UsageError(f"setting 'retry_schedule' has {len(listed)} waits; at most {MAX_WAITS}")
    return tuple(
        seconds(wait, "each wait of setting 'retry_schedule'", zero=True) for wait in listed
    )


def _methods(methods: object) -> frozenset[str]:
    if isinstance(methods, str) or not isinstance(methods, Iterable):
        raise UsageError(f"setting 'retry_methods' must be a list of methods, got {methods!r}")
    names = list(methods)
    if not names or not all(isinstance(m, str) and m.isalpha() and m.isascii() for m in names):
        raise UsageError(
            f"setting 'retry_methods' must name one method or more (None: all), got {methods!r}"
        )
    return frozenset(m.upper() for m in names)


def _statuses(statuses: object) -> frozenset[int]:
    if isinstance(statuses, (str, bytes)) or not isinstance(statuses, Iterable):
        raise UsageError(f"setting 'retry_statuses' must be a list of statuses, got {statuses!r}")
    listed = list(statuses)
    for status in listed:
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise UsageError(
                f"setting 'retry_statuses' takes HTTP error statuses (400..599), got {status!r}"
            )
    return frozenset(listed)
