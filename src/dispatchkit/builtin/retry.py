"""Built-in retry policy, made of tenacity's strategies.

* A connect error is retried for every method: nothing was sent (unless it is
  not ``transient``: a proxy that refused the tunnel with a 4xx refuses again).
* A timeout, a broken connection, and HTTP 429, 502, 503, 504 are retried
  only for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE): a POST may
  have run already.
* Waits back off exponentially with full jitter; ``Retry-After`` (seconds or an
  HTTP date) replaces the backoff, capped at ``retry_after_cap``.
* Bounded by ``retry_attempts`` and by ``retry_max_time``: no attempt starts
  whose wait would end past it.
* Never into an open circuit breaker or a disabled URL: ``CircuitOpenError`` and
  ``EndpointDisabledError`` are not ``transient``, so they end the call at once
  (an open breaker's cool-down is seconds to minutes, past any retry budget; the
  caller gets ``retry_at`` and may come back then). A wait for the rate limit or
  a slot that ran out of time is a ``DispatchTimeout``, retried like any timeout.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import tenacity

from dispatchkit.exceptions import (
    ConnectError,
    DispatchError,
    HTTPStatusError,
    RemoteExecuteError,
    TransportError,
)
from dispatchkit.hookspecs import hookimpl

if TYPE_CHECKING:
    from dispatchkit._settings import Settings

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})


def is_retryable(exc: BaseException) -> bool:
    """The retry predicate of the default policy (see the module docstring)."""
    if not isinstance(exc, DispatchError):
        return False
    if isinstance(exc, ConnectError):
        return exc.transient  # a proxy that refused the tunnel with a 4xx will again
    if exc.method not in IDEMPOTENT_METHODS:
        return False
    if isinstance(exc, TransportError):
        return exc.transient
    if isinstance(exc, (HTTPStatusError, RemoteExecuteError)):
        return exc.status in RETRY_STATUSES
    return False


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or ``None`` when it is absent or garbage."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True too
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _retry_after(exc: BaseException | None) -> float | None:
    headers = getattr(exc, "headers", None)
    if not headers:
        return None
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    return parse_retry_after(value)


class wait_retry_after(tenacity.wait.wait_base):
    """Wait what ``Retry-After`` asks, up to ``cap``; otherwise what ``fallback`` says."""

    def __init__(self, fallback: tenacity.wait.wait_base, cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        asked = _retry_after(outcome.exception() if outcome is not None else None)
        if asked is not None:
            return min(asked, self.cap)
        return self.fallback(retry_state)


def default_policy(
    attempts: int, max_time: float, backoff: float, retry_after_cap: float
) -> tenacity.Retrying:
    """The built-in policy; usable as a base for a plugin's own."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_before_delay(max_time),
        wait=wait_retry_after(
            tenacity.wait_random_exponential(multiplier=backoff, max=max_time),
            retry_after_cap,
        ),
        retry=tenacity.retry_if_exception(is_retryable),
        reraise=True,
    )


class Plugin:
    name = "retry"

    @hookimpl(trylast=True)
    def dispatchkit_retry_policy(self, settings: Settings) -> tenacity.Retrying:
        return default_policy(
            settings.retry_attempts,
            settings.retry_max_time,
            settings.retry_backoff,
            settings.retry_after_cap,
        )
