"""Built-in endpoint isolation, in this process: breakers, rate limits, caps, 410 Gone.

Four settings, all off by default; any of them turns the guard on:

* ``circuit_breaker``: ``True``, or a mapping of ``failures`` (5 in a row open
  it), ``cooldown`` (30 s open before one probe) and ``max_cooldown`` (600 s:
  the cool-down doubles per failed probe, up to this);
* ``rate_limits``: origin to ``"N/s"``, ``"N/m"`` or ``"N/h"``, and ``"*"`` for
  every other origin (each gets its own bucket); a bucket holds one second's
  worth of calls, at least one;
* ``origin_concurrency``: attempts in flight per origin;
* ``disable_on_gone``: a ``410 Gone`` answer disables its URL (without the query).

The state is this process's, one :class:`MemoryGuard` per dispatcher, behind
one lock. :class:`EndpointPolicy` reads and checks the settings, for a guard
that keeps its state elsewhere too.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from dispatchkit._checks import count, seconds
from dispatchkit._endpoints import (
    ADMITTED,
    PROBE,
    Admission,
    EndpointState,
    Verdict,
    endpoint_key,
)
from dispatchkit.exceptions import UsageError
from dispatchkit.hookspecs import hookimpl

if TYPE_CHECKING:
    from dispatchkit._settings import Settings

#: Seconds between two looks for a free slot while ``origin_concurrency`` are in flight.
SLOT_POLL = 0.01
#: Past this many origins, those in their initial state are forgotten (and made again).
SWEEP_AT = 1024
_RATE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*/\s*([smh])\s*")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
_BREAKER_KEYS = ("failures", "cooldown", "max_cooldown")
_DISABLED = Admission("disabled", reason="it answered 410 Gone")


@dataclass(frozen=True, slots=True)
class Breaker:
    """A circuit breaker's parameters: open after ``failures`` in a row, for ``cooldown``
    seconds, doubled per failed probe up to ``max_cooldown``."""

    failures: int = 5
    cooldown: float = 30.0
    max_cooldown: float = 600.0


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``per_second`` calls a second, as ``text`` said (``"50/s"``); bursts of ``burst``."""

    text: str
    per_second: float

    @property
    def burst(self) -> float:
        """One second's worth of calls, at least one."""
        return max(1.0, self.per_second)


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """The four settings, checked; :meth:`from_settings` reads them."""

    breaker: Breaker | None = None
    rate_limits: Mapping[str, RateLimit] = field(default_factory=dict)  # origin or "*"
    concurrency: int | None = None
    disable_on_gone: bool = False

    @property
    def active(self) -> bool:
        """Whether anything is to be guarded at all."""
        return bool(self.breaker or self.rate_limits or self.concurrency or self.disable_on_gone)

    def rate_limit(self, origin: str) -> RateLimit | None:
        return self.rate_limits.get(origin) or self.rate_limits.get("*")

    @classmethod
    def from_settings(
        cls, settings: Settings, *, circuit_breaker: object = False, disable_on_gone: bool = False
    ) -> EndpointPolicy:
        """Read (and mark as read) the settings; a bad one is a :class:`UsageError`.

        ``circuit_breaker`` and ``disable_on_gone`` are the values of those settings when
        they are not given: off here, on for the Celery executor's workers.
        """
        concurrency = settings.extra("origin_concurrency")
        gone = settings.extra("disable_on_gone", disable_on_gone)
        if not isinstance(gone, bool):
            raise UsageError(f"setting 'disable_on_gone' must be True or False, got {gone!r}")
        return cls(
            breaker=parse_breaker(settings.extra("circuit_breaker", circuit_breaker)),
            rate_limits=parse_rate_limits(settings.extra("rate_limits")),
            concurrency=None
            if concurrency is None
            else count(concurrency, "setting 'origin_concurrency'"),
            disable_on_gone=gone,
        )


def parse_breaker(value: object) -> Breaker | None:
    """``circuit_breaker``: ``False``/``None`` (off), ``True`` (defaults), or a mapping."""
    if value is None or value is False:
        return None
    if value is True:
        return Breaker()
    if not isinstance(value, Mapping):
        raise UsageError(
            "setting 'circuit_breaker' takes True, False or a mapping of "
            f"{', '.join(_BREAKER_KEYS)}; got {value!r}"
        )
    unknown = sorted(set(map(str, value)) - set(_BREAKER_KEYS))
    if unknown:
        raise UsageError(
            f"setting 'circuit_breaker' has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(_BREAKER_KEYS)}"
        )
    failures = count(value.get("failures", 5), "circuit_breaker 'failures'")
    cooldown = seconds(value.get("cooldown", 30.0), "circuit_breaker 'cooldown'")
    ceiling = seconds(
        value.get("max_cooldown", max(600.0, cooldown)), "circuit_breaker 'max_cooldown'"
    )
    if ceiling < cooldown:
        raise UsageError(
            f"circuit_breaker 'max_cooldown' ({ceiling:g}) is shorter than 'cooldown' "
            f"({cooldown:g})"
        )
    return Breaker(failures, cooldown, ceiling)


def parse_rate(text: object, what: str) -> RateLimit:
    """``"N/s"``, ``"N/m"`` or ``"N/h"`` with ``N`` a positive number."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if match is None or float(match[1]) <= 0:
        raise UsageError(f"{what} must be like '50/s', '100/m' or '1000/h', got {text!r}")
    return RateLimit(match[0].strip(), float(match[1]) / _PER[match[2]])


def parse_rate_limits(value: object) -> dict[str, RateLimit]:
    """``rate_limits``: ``{origin or "*": rate}``, each origin written once."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UsageError(f"setting 'rate_limits' takes a mapping of origin to rate, got {value!r}")
    limits: dict[str, RateLimit] = {}
    for key, rate in value.items():
        origin = "*" if key == "*" else _origin(key)
        if origin in limits:
            raise UsageError(f"setting 'rate_limits' names the origin {origin} twice")
        limits[origin] = parse_rate(rate, f"rate_limits[{key!r}]")
    return limits


def _origin(key: object) -> str:
    try:
        parts = urlsplit(key) if isinstance(key, str) else None
    except ValueError:  # "http://[::1": not a URL
        parts = None
    if parts is None or parts.path not in ("", "/") or parts.query or "@" in parts.netloc:
        raise UsageError(
            f"setting 'rate_limits' takes origins ('https://api.example.com') or '*', got {key!r}"
        )
    return endpoint_key(key)[0]  # type: ignore[arg-type]


# -- the state ---------------------------------------------------------------------------

State = Literal["closed", "open", "half-open"]


class _Origin:
    """One origin's state; read and written under the guard's lock only."""

    __slots__ = (
        "cooldown",
        "disabled",
        "failures",
        "in_flight",
        "probing",
        "rate",
        "refilled",
        "retry_at",
        "state",
        "tokens",
    )

    def __init__(self, rate: RateLimit | None, cooldown: float, now: float) -> None:
        self.rate = rate
        self.in_flight = 0
        self.disabled: dict[str, float] = {}  # endpoint -> when it answered 410
        self.restart(cooldown, now)

    def restart(self, cooldown: float, now: float) -> None:
        self.state: State = "closed"
        self.failures = 0
        self.cooldown = cooldown
        self.retry_at = 0.0
        self.probing = False
        self.tokens = self.rate.burst if self.rate else 0.0
        self.refilled = now
        self.disabled.clear()

    def idle(self, now: float) -> bool:
        """As if new: nothing learned, nothing in flight, the bucket full again."""
        if self.state != "closed" or self.failures or self.in_flight or self.disabled:
            return False
        rate = self.rate
        return rate is None or self.tokens + (now - self.refilled) * rate.per_second >= rate.burst

    def open(self, now: float) -> None:
        self.state, self.retry_at = "open", now + self.cooldown


class MemoryGuard:
    """The in-process :class:`~dispatchkit.EndpointGuard` of ``policy``; thread-safe."""

    def __init__(self, policy: EndpointPolicy) -> None:
        self.policy = policy
        self._cooldown = policy.breaker.cooldown if policy.breaker else 0.0
        self._origins: dict[str, _Origin] = {}
        self._sweep_at = SWEEP_AT
        self._lock = threading.Lock()

    def admit(self, origin: str, endpoint: str, now: float) -> Admission:
        with self._lock:
            entry = self._origins.get(origin) or self._add(origin, now)
            if entry.disabled and endpoint in entry.disabled:
                return _DISABLED
            probe = entry.state != "closed"
            if probe:
                if entry.state == "open":
                    if now < entry.retry_at:
                        reason = f"{entry.failures} failures in a row"
                        return Admission("open", retry_at=entry.retry_at, reason=reason)
                    entry.state = "half-open"
                if entry.probing:
                    return Admission("open", retry_at=now, reason="its one probe is in flight")
            cap = self.policy.concurrency
            if cap is not None and entry.in_flight >= cap:
                why = f"{entry.in_flight} calls in flight (origin_concurrency={cap})"
                return Admission("wait", wait=SLOT_POLL, reason=why)
            rate = entry.rate
            if rate is not None:
                elapsed = max(0.0, now - entry.refilled)
                tokens = min(rate.burst, entry.tokens + elapsed * rate.per_second)
                entry.tokens, entry.refilled = tokens, now
                if tokens < 1.0:
                    wait = (1.0 - tokens) / rate.per_second
                    return Admission("wait", wait=wait, reason=f"rate limit {rate.text}")
                entry.tokens = tokens - 1.0
            entry.in_flight += 1
            if probe:
                entry.probing = True
                return PROBE
            return ADMITTED

    def report(
        self, origin: str, endpoint: str, verdict: Verdict, now: float, *, probe: bool = False
    ) -> None:
        breaker = self.policy.breaker
        with self._lock:
            entry = self._origins.get(origin)
            if entry is None:
                return
            entry.in_flight = max(0, entry.in_flight - 1)
            if verdict == "gone" and self.policy.disable_on_gone:
                entry.disabled[endpoint] = now
            if breaker is None:
                return
            if probe and entry.probing and entry.state == "half-open":
                entry.probing = False
                if verdict == "failure":
                    entry.failures += 1
                    entry.cooldown = min(entry.cooldown * 2, breaker.max_cooldown)
                    entry.open(now)
                elif verdict != "neutral":  # a neutral probe lets the next caller probe
                    entry.state, entry.failures, entry.cooldown = "closed", 0, breaker.cooldown
            elif entry.state == "closed" and verdict != "neutral":
                if verdict != "failure":
                    entry.failures = 0
                else:
                    entry.failures += 1
                    if entry.failures >= breaker.failures:
                        entry.open(now)
            # Otherwise a late report of an attempt admitted before the breaker opened.

    def states(self, now: float) -> list[EndpointState]:
        policy = self.policy
        with self._lock:
            return [
                EndpointState(
                    origin=origin,
                    breaker=_shown(entry, now) if policy.breaker else None,
                    failures=entry.failures,
                    retry_at=entry.retry_at if entry.state != "closed" else None,
                    cooldown=entry.cooldown if policy.breaker else None,
                    rate_limit=entry.rate.text if entry.rate else None,
                    concurrency=policy.concurrency,
                    in_flight=entry.in_flight,
                    disabled=tuple(sorted(entry.disabled)),
                )
                for origin, entry in self._origins.items()
            ]

    def enable(self, endpoint: str) -> bool:
        with self._lock:
            entry = self._origins.get(endpoint_key(endpoint)[0])
            return entry is not None and entry.disabled.pop(endpoint, None) is not None

    def reset(self, origin: str) -> bool:
        """Close the breaker, fill the bucket, enable every URL; attempts in flight stay counted."""
        with self._lock:
            entry = self._origins.get(origin)
            if entry is None:
                return False
            entry.restart(self._cooldown, time.time())
            return True

    def __repr__(self) -> str:
        return f"<MemoryGuard origins={len(self._origins)}>"

    def _add(self, origin: str, now: float) -> _Origin:
        origins = self._origins
        if len(origins) >= self._sweep_at:
            for key in [key for key, entry in origins.items() if entry.idle(now)]:
                del origins[key]
            self._sweep_at = max(SWEEP_AT, 2 * len(origins))
        entry = origins[origin] = _Origin(self.policy.rate_limit(origin), self._cooldown, now)
        return entry


def _shown(entry: _Origin, now: float) -> State:
    if entry.state == "open" and now >= entry.retry_at:
        return "half-open"  # the next attempt is the probe
    return entry.state


class Plugin:
    name = "endpoints"

    def __init__(self) -> None:
        self.policy = EndpointPolicy()

    @hookimpl(trylast=True)
    def dispatchkit_configure(self, settings: Settings) -> None:
        self.policy = EndpointPolicy.from_settings(settings)

    @hookimpl(trylast=True)
    def dispatchkit_endpoint_guard(self, settings: Settings) -> MemoryGuard | None:
        return MemoryGuard(self.policy) if self.policy.active else None
