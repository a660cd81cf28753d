"""Endpoint isolation, the part every guard shares: keys, verdicts, values, the protocol.

An :class:`EndpointGuard` (from the ``dispatchkit_endpoint_guard`` hook) keeps
per-origin state: a circuit breaker, a rate limit, a cap on calls in flight,
and the URLs disabled by ``410 Gone``. The Pipeline asks it before each attempt
(:meth:`EndpointGuard.admit`) and tells it how the attempt went
(:meth:`EndpointGuard.report`); both take plain strings and numbers, so that a
shared store (Redis) can answer each in one round trip. The built-in, in-process
guard is :class:`dispatchkit.builtin.endpoints.MemoryGuard`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from dispatchkit.exceptions import (
    CircuitOpenError,
    DispatchError,
    EndpointDisabledError,
    HTTPStatusError,
    InvalidResponseError,
    RemoteExecuteError,
    TransportError,
    UsageError,
)

#: How an attempt went, for a guard: ``"failure"`` (nothing usable came back, or the
#: receiver is unavailable: 429, 502, 503, 504, another 5xx without a failure envelope),
#: ``"gone"`` (410), ``"success"`` (any other answer: the receiver is up) or ``"neutral"``
#: (it never reached the receiver: refused before sending, cancelled, a plugin's failure).
Verdict = Literal["success", "failure", "gone", "neutral"]

#: Statuses that say the receiver is unavailable, whatever the body (a failure envelope too).
UNAVAILABLE = frozenset({429, 502, 503, 504})
GONE = 410
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Admission:
    """A guard's answer to an attempt about to start.

    ``verdict`` is ``"go"`` (the attempt holds a slot until it is reported),
    ``"wait"`` (ask again in ``wait`` seconds), ``"open"`` (the origin's breaker is
    open until ``retry_at``, seconds since the epoch) or ``"disabled"`` (the URL
    answered 410 Gone). ``probe`` marks the one attempt a half-open breaker lets
    through; ``reason`` says why in words, for the error a caller sees.
    """

    verdict: Literal["go", "wait", "open", "disabled"]
    wait: float = 0.0
    retry_at: float | None = None
    probe: bool = False
    reason: str = ""


#: The common answer, made once.
ADMITTED = Admission("go")
#: The half-open breaker's probe.
PROBE = Admission("go", probe=True)


@dataclass(frozen=True, slots=True)
class EndpointState:
    """One origin as a guard sees it, for ``dispatcher.endpoints.list()``.

    ``breaker`` is ``"closed"``, ``"open"`` or ``"half-open"`` (``None`` without a
    breaker); ``failures`` the failures in a row; ``retry_at`` when an open breaker
    lets its next probe through (seconds since the epoch) and ``cooldown`` how
    long it stays open this time; ``rate_limit`` as given (``"50/s"``) and
    ``concurrency`` the cap on calls in flight (``None`` when unlimited);
    ``in_flight`` the attempts under way; ``disabled`` the URLs (without query)
    that answered 410 Gone.
    """

    origin: str
    breaker: Literal["closed", "open", "half-open"] | None = None
    failures: int = 0
    retry_at: float | None = None
    cooldown: float | None = None
    rate_limit: str | None = None
    concurrency: int | None = None
    in_flight: int = 0
    disabled: tuple[str, ...] = ()


@runtime_checkable
class EndpointGuard(Protocol):
    """Per-origin state shared by the attempts of a dispatcher (or of many processes).

    ``admit`` and ``report`` are on every attempt's path: each must be one
    atomic step (one lock, one Lua script). ``origin`` is ``scheme://host:port``
    (lower-case, the port always written); ``endpoint`` the URL without its
    query; ``now`` seconds since the epoch. Every ``"go"`` admission is
    reported exactly once, ``probe`` repeated from the admission.
    """

    def admit(self, origin: str, endpoint: str, now: float) -> Admission:
        """May an attempt to ``endpoint`` start ``now``? A ``"go"`` takes its slot and token."""
        ...

    def report(
        self, origin: str, endpoint: str, verdict: Verdict, now: float, *, probe: bool = False
    ) -> None:
        """How an admitted attempt ended; gives its slot back. Must not raise."""
        ...

    def states(self, now: float) -> list[EndpointState]:
        """Every origin the guard keeps state for."""
        ...

    def enable(self, endpoint: str) -> bool:
        """Enable ``endpoint`` again; ``False`` when it was not disabled."""
        ...

    def reset(self, origin: str) -> bool:
        """Forget ``origin``'s breaker, bucket and disabled URLs; ``False`` when none was kept."""
        ...


class Ticket:
    """A call's place with the guard: its keys (worked out once), and the slot it holds."""

    __slots__ = ("endpoint", "held", "origin", "probe", "since")

    def __init__(self, origin: str, endpoint: str) -> None:
        self.origin = origin
        self.endpoint = endpoint
        self.held = False  # a "go" not yet reported
        self.probe = False
        self.since: float | None = None  # time.monotonic() when this attempt began to wait


def endpoint_key(url: str) -> tuple[str, str]:
    """``(origin, endpoint)`` of ``url``: ``scheme://host:port`` and that plus the path.

    Scheme and host are lower-cased, the default port written out, the userinfo,
    query and fragment dropped. A URL without a host or with a bad port is a
    :class:`UsageError`.
    """
    # Neither part depends on the query or the fragment: a fan-out's URLs, which
    # differ in their query only, share one cached answer.
    cut = min(i for i in (url.find("?"), url.find("#"), len(url)) if i >= 0)
    return _endpoint_key(url[:cut])


@functools.lru_cache(maxsize=1024)
def _endpoint_key(url: str) -> tuple[str, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"cannot tell the origin of {url!r}: {exc}") from None
    scheme, host = parts.scheme.lower(), parts.hostname
    if not scheme or not host:
        raise UsageError(f"cannot tell the origin of {url!r}: no scheme or host")
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    if ":" in host:
        host = f"[{host}]"
    origin = f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"
    return origin, origin + (parts.path or "/")


def verdict_of(error: BaseException | None) -> Verdict:
    """What an attempt's end says about its receiver: ``None`` is a 2xx answer."""
    if error is None:
        return "success"
    if isinstance(error, (HTTPStatusError, RemoteExecuteError)):
        status = error.status or 0
        if status == GONE:
            return "gone"
        if status in UNAVAILABLE or (status >= 500 and isinstance(error, HTTPStatusError)):
            return "failure"  # a 500 with a failure envelope is the task's, not the receiver's
        return "success"
    if isinstance(error, InvalidResponseError):
        return "success"  # an answer came, however odd
    if isinstance(error, TransportError):
        return "failure"
    return "neutral"  # refused before sending, a plugin's failure, a cancellation


class Endpoints:
    """``dispatcher.endpoints``: see and manage the guard's per-origin state.

    Without a guard (no ``circuit_breaker``, ``rate_limits``, ``origin_concurrency``
    or ``disable_on_gone``) there is nothing to see: :meth:`list` is empty and
    :meth:`enable` and :meth:`reset` return ``False``.
    """

    __slots__ = ("_guard",)

    def __init__(self, guard: EndpointGuard | None) -> None:
        self._guard = guard

    @property
    def guard(self) -> EndpointGuard | None:
        """The guard in use (``dispatchkit_endpoint_guard``'s), ``None`` without one."""
        return self._guard

    def list(self) -> list[EndpointState]:
        """Every origin the guard keeps state for, sorted by origin."""
        if self._guard is None:
            return []
        return sorted(self._guard.states(time.time()), key=lambda state: state.origin)

    def enable(self, url: str) -> bool:
        """Enable ``url`` (its query is ignored) again; ``False`` when it was not disabled."""
        return self._guard is not None and self._guard.enable(endpoint_key(url)[1])

    def reset(self, origin: str) -> bool:
        """Forget ``origin``'s state (breaker closed, bucket full, URLs enabled).

        ``origin`` may be any URL on it; returns ``False`` when there was none.
        """
        return self._guard is not None and self._guard.reset(endpoint_key(origin)[0])

    def __repr__(self) -> str:
        return f"<Endpoints guard={self._guard!r}>"


def refusal(admission: Admission, origin: str, endpoint: str) -> DispatchError:
    """The error a caller gets for an ``"open"`` or ``"disabled"`` admission."""
    if admission.verdict == "disabled":
        return EndpointDisabledError(
            f"{endpoint} is disabled: {admission.reason or 'it answered 410 Gone'}",
            endpoint=endpoint,
        )
    retry_at = time.time() if admission.retry_at is None else admission.retry_at
    return CircuitOpenError(
        f"circuit breaker open for {origin} ({admission.reason or 'too many failures'}); "
        f"next probe in {max(0.0, retry_at - time.time()):.3g} s",
        origin=origin,
        retry_at=retry_at,
    )
