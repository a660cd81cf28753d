"""Endpoint isolation shared by every process: the guard's state in Redis.

:class:`RedisGuard` is the :class:`~dispatchkit.EndpointGuard` of the Celery
workers (and of any Dispatcher given ``endpoints_redis``): the semantics of the
in-process ``MemoryGuard`` (read it first), with the state in Redis, so that 8
worker processes on 3 hosts see one breaker, one bucket and one count of calls
in flight per origin. Each :meth:`~RedisGuard.admit` and each
:meth:`~RedisGuard.report` is one Lua script, one round trip, on Redis's clock
(``TIME``): one clock for every host. Keys, under ``dispatchkit:endpoints:``:

* ``origins``: a sorted set, origin -> when an attempt to it was last admitted
  (what ``states()`` lists);
* ``origin:<origin>``: a hash. With a breaker: ``state`` (``closed``, ``open``,
  ``half-open``; none yet: closed), ``failures`` in a row, ``cooldown``,
  ``retry_at``, and ``probe``/``probe_until``: the lease of the one probe in
  flight and when it expires. With a rate limit: ``tokens`` and ``refilled``
  (the bucket) and ``rate`` (as given, for the listing); with a cap, ``cap``.
  It expires after a day (or twice ``max_cooldown``) without an attempt: an
  idle origin starts again from scratch, as a forgotten one does in-process;
* ``flight:<origin>``: a sorted set, lease -> when it expires: the attempts in
  flight. Each admitted attempt holds a lease of twice the longest attempt
  (the dispatcher's ``deadline``, else 6 x ``timeout``); its report removes it,
  and a process killed during an attempt gives its slot (and its probe) back
  when the lease ends;
* ``disabled:<origin>``: a hash, URL (without query) -> when it answered 410
  Gone; kept until ``enable`` or ``reset``.

Every process applies its own settings (the breaker's thresholds, the rates,
the cap) to the shared state: give every process the same ones.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.client import Pipeline

from dispatchkit import (
    Admission,
    CircuitOpenError,
    DispatchError,
    DispatchTimeout,
    EndpointState,
    Settings,
    TransportError,
    Verdict,
    mask_url,
)
from dispatchkit._endpoints import ADMITTED, PROBE, endpoint_key
from dispatchkit.builtin.endpoints import EndpointPolicy
from dispatchkit.builtin.transport import DEADLINE_FACTOR
from dispatchkit_celery._coalesce import Coalescer, Script

log = logging.getLogger("dispatchkit.celery")

PREFIX = "dispatchkit:endpoints:"
#: Seconds an origin's state is kept without an attempt (at least; see ``ttl``).
STATE_TTL = 24 * 3600
#: A slot's lease, in multiples of the longest attempt.
LEASE_FACTOR = 2
#: Seconds added to a deferral, at random: at least the first, at most the second.
DEFER_JITTER = (0.1, 1.0)
#: And a random part of the wait itself, up to this fraction: deferred calls spread out.
DEFER_SPREAD = 0.1
#: Seconds (at least, at most) a call waits while its origin's one probe is in flight.
PROBE_WAIT = (1.0, 5.0)
#: Seconds a call waits when the guard's Redis did not answer its admission.
UNAVAILABLE_WAIT = 5.0
_DISABLED = Admission("disabled", reason="it answered 410 Gone")
#: Numbers the leases of this process, whichever guard takes them: host:pid:n is unique.
_lease_ids = itertools.count()

# KEYS: the origin's hash, its flight set, its disabled hash, the origins set.
# ARGV: 1 origin, 2 endpoint, 3 lease id, 4 lease seconds, 5 failures that open the breaker
# (0: no breaker), 6 cooldown, 7 rate per second (0: none), 8 burst, 9 rate as given,
# 10 cap (0: none), 11 seconds the hash is kept.
# Returns {'go', probe}, {'wait', seconds, reason}, {'open', retry_at, reason} or {'disabled'}.
_ADMIT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function num(x) return string.format('%.17g', x) end
local origin = KEYS[1]
redis.call('ZADD', KEYS[4], now, ARGV[1])
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then
  return {'disabled'}
end
local probe = 0
if tonumber(ARGV[5]) > 0 then
  local state = redis.call('HGET', origin, 'state') or 'closed'
  if state ~= 'closed' then
    if state == 'open' then
      local retry_at = tonumber(redis.call('HGET', origin, 'retry_at') or '0')
      if now < retry_at then
        local failures = redis.call('HGET', origin, 'failures') or '0'
        return {'open', num(retry_at), failures .. ' failures in a row'}
      end
      redis.call('HSET', origin, 'state', 'half-open')
    end
    if tonumber(redis.call('HGET', origin, 'probe_until') or '0') > now then
      return {'open', num(now), 'its one probe is in flight'}
    end
    probe = 1
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local cap = tonumber(ARGV[10])
if cap > 0 then
  redis.call('HSET', origin, 'cap', ARGV[10])
  local flight = redis.call('ZCARD', KEYS[2])
  if flight >= cap then
    redis.call('EXPIRE', origin, ARGV[11])
    return {'wait', '0.01', flight .. ' calls in flight (origin_concurrency=' .. cap .. ')'}
  end
end
local rate = tonumber(ARGV[7])
if rate > 0 then
  local burst = tonumber(ARGV[8])
  local tokens = tonumber(redis.call('HGET', origin, 'tokens') or ARGV[8])
  local refilled = tonumber(redis.call('HGET', origin, 'refilled') or now)
  tokens = math.min(burst, tokens + math.max(0, now - refilled) * rate)
  if tokens < 1 then
    redis.call('HSET', origin, 'tokens', num(tokens), 'refilled', num(now), 'rate', ARGV[9])
    redis.call('EXPIRE', origin, ARGV[11])
    return {'wait', num((1 - tokens) / rate), 'rate limit ' .. ARGV[9]}
  end
  redis.call('HSET', origin, 'tokens', num(tokens - 1), 'refilled', num(now), 'rate', ARGV[9])
end
local lease_until = now + tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], lease_until, ARGV[3])
redis.call('PEXPIREAT', KEYS[2], math.ceil(lease_until * 1000) + 1000)
if probe == 1 then
  redis.call('HSET', origin, 'probe', ARGV[3], 'probe_until', num(lease_until))
end
redis.call('EXPIRE', origin, ARGV[11])
return {'go', probe}
""")

# KEYS: as for _ADMIT. ARGV: 1 origin, 2 endpoint, 3 verdict, 4 lease id, 5 probe (1 or 0),
# 6 failures that open the breaker (0: no breaker), 7 cooldown, 8 max cooldown,
# 9 disable_on_gone (1 or 0), 10 seconds the hash is kept.
_REPORT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function num(x) return string.format('%.17g', x) end
local origin, verdict = KEYS[1], ARGV[3]
redis.call('ZREM', KEYS[2], ARGV[4])
if verdict == 'gone' and ARGV[9] == '1' then
  redis.call('HSET', KEYS[3], ARGV[2], num(now))
  redis.call('ZADD', KEYS[4], now, ARGV[1])
end
local threshold = tonumber(ARGV[6])
if threshold == 0 then
  return 0
end
redis.call('HSETNX', origin, 'cooldown', ARGV[7])
local state = redis.call('HGET', origin, 'state') or 'closed'
if ARGV[5] == '1' and state == 'half-open' and redis.call('HGET', origin, 'probe') == ARGV[4] then
  if verdict == 'failure' then
    local cooldown = tonumber(redis.call('HGET', origin, 'cooldown'))
    cooldown = math.min(cooldown * 2, tonumber(ARGV[8]))
    redis.call('HINCRBY', origin, 'failures', 1)
    redis.call('HSET', origin, 'state', 'open', 'cooldown', num(cooldown),
               'retry_at', num(now + cooldown))
    redis.call('HDEL', origin, 'probe', 'probe_until')
  elseif verdict ~= 'neutral' then
    redis.call('HSET', origin, 'state', 'closed', 'failures', '0', 'cooldown', ARGV[7])
    redis.call('HDEL', origin, 'probe', 'probe_until', 'retry_at')
  else
    redis.call('HDEL', origin, 'probe', 'probe_until')  -- the next caller probes
  end
elseif state == 'closed' and verdict ~= 'neutral' then
  if verdict ~= 'failure' then
    if redis.call('HGET', origin, 'failures') ~= '0' then
      redis.call('HSET', origin, 'failures', '0')
    end
  elseif redis.call('HINCRBY', origin, 'failures', 1) >= threshold then
    local cooldown = tonumber(redis.call('HGET', origin, 'cooldown'))
    redis.call('HSET', origin, 'state', 'open', 'retry_at', num(now + cooldown))
  end
end
-- Otherwise a late report of an attempt admitted before the breaker opened.
redis.call('EXPIRE', origin, ARGV[10])
return 1
""")


class GuardUnavailable(TransportError):
    """The guard's Redis did not answer an admission: nothing was sent.

    ``transient``: the attempt may be tried again (a worker hands the message
    back to the broker, as when the delivery ledger is unreachable).
    """


class EndpointBusy(DispatchTimeout):
    """No slot (rate limit, cap) within the worker's ``endpoint_wait``: nothing was sent.

    Raised by :meth:`RedisGuard.admit` only inside :func:`deferrable` (a worker
    running an attempt of a call with a durable schedule), which puts the call
    back in the delivery ledger until ``retry_at`` without spending an attempt.
    """

    def __init__(self, message: str, *, origin: str, retry_at: float) -> None:
        super().__init__(message)
        self.origin = origin
        self.retry_at = retry_at


#: (until when, in time.monotonic(), and how many seconds) a worker process may wait for a
#: slot in this context; ``None``: as long as the call's timeout allows (in-process rules).
_patience: ContextVar[tuple[float, float] | None] = ContextVar("dispatchkit_patience", default=None)


@contextlib.contextmanager
def deferrable(seconds: float) -> Iterator[None]:
    """Within this block, a wait for a slot longer than ``seconds`` raises :class:`EndpointBusy`."""
    token = _patience.set((time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _patience.reset(token)


def deferred_until(
    error: DispatchError, now: float, rng: random.Random | None = None
) -> float | None:
    """When a call the guard turned away comes back (unix seconds); ``None``: not such a call.

    An open breaker (:class:`~dispatchkit.CircuitOpenError`) is waited out until
    ``retry_at`` (while its one probe is in flight, 1 to 5 s), a busy origin
    (:class:`EndpointBusy`) until its next slot, a guard whose Redis did not
    answer (:class:`GuardUnavailable`) for :data:`UNAVAILABLE_WAIT`; plus a
    little jitter (0.1 to 1 s, and up to a tenth of the wait), so that the calls
    deferred together do not all come back in the same instant.
    """
    pick = rng or random
    if isinstance(error, (CircuitOpenError, EndpointBusy)):
        wait = max(0.0, error.retry_at - now)
        if isinstance(error, CircuitOpenError) and wait == 0.0:
            wait = pick.uniform(*PROBE_WAIT)  # the probe decides soon: ask again then
    elif isinstance(error, GuardUnavailable):
        wait = UNAVAILABLE_WAIT
    else:
        return None
    return now + wait + pick.uniform(*DEFER_JITTER) + pick.uniform(0.0, DEFER_SPREAD * wait)


def _decoded(reply: list[Any]) -> list[Any]:
    """A script's reply read on a client that does not decode (the ledger's): as this one's."""
    return [item.decode() if isinstance(item, bytes) else item for item in reply]


@dataclass(slots=True)
class _Ahead:
    """An admission asked for before the dispatcher asks: its lease, then its reply."""

    origin: str
    endpoint: str
    lease: str
    reply: list[Any] | None = None


#: Reports of attempts' verdicts, each the keys and arguments of one _REPORT.
Reports = list[tuple[list[str], list[str | float]]]


def queue_reports(pipe: Pipeline, reports: Reports) -> None:
    """Queue ``reports`` (a :class:`Ride`'s) on ``pipe``."""
    for keys, args in reports:
        _REPORT.queue(pipe, keys, args)


class Ride:
    """A call whose guard round trips ride on the worker's writes (:meth:`RedisGuard.ride`)."""

    __slots__ = ("ahead", "guard", "reports")

    def __init__(self, guard: RedisGuard, ahead: _Ahead) -> None:
        self.guard = guard
        self.ahead: _Ahead | None = ahead
        self.reports: Reports = []

    def queue_admission(self, pipe: Pipeline) -> None:
        """Queue the call's admission on ``pipe``; hand its reply to :meth:`admitted`."""
        ahead = self.ahead
        if ahead is not None:
            guard = self.guard
            args = guard._admit_args(ahead.origin, ahead.endpoint, ahead.lease)
            _ADMIT.queue(pipe, guard.keys(ahead.origin), args)

    def admitted(self, reply: Any) -> None:
        """The reply of the admission :meth:`queue_admission` queued (an error: ask again)."""
        if self.ahead is not None:
            if isinstance(reply, Exception):
                self.ahead = None  # the dispatcher asks the guard itself
            else:
                self.ahead.reply = list(reply)

    def take_reports(self) -> Reports:
        """The reports kept so far, for the worker to carry (:func:`queue_reports`)."""
        reports, self.reports = self.reports, []
        return reports

    def flush(self) -> None:
        """Send the reports kept so far now, on the guard's own round trip."""
        reports, self.reports = self.reports, []
        if reports:
            self.guard._send_reports(reports)


#: The ride of the worker's call running in this context, if any.
_riding: ContextVar[Ride | None] = ContextVar("dispatchkit_riding", default=None)


def lease_for(settings: Settings) -> float:
    """Seconds an admitted attempt holds its slot at most: twice the dispatcher's longest one."""
    return float(LEASE_FACTOR * (settings.deadline or DEADLINE_FACTOR * settings.timeout))


class RedisGuard:
    """The :class:`~dispatchkit.EndpointGuard` of ``policy`` over the Redis at ``url``.

    Thread-safe (redis-py pools connections). ``lease``: seconds an admitted
    attempt holds its slot unless reported first (see :func:`lease_for`);
    ``prefix`` names the keys.
    """

    def __init__(
        self, url: str, policy: EndpointPolicy, *, lease: float, prefix: str = PREFIX
    ) -> None:
        self.url = url
        self.policy = policy
        self.lease = lease
        self.prefix = prefix
        self.origins = prefix + "origins"
        breaker = policy.breaker
        self._breaker = (
            (breaker.failures, breaker.cooldown, breaker.max_cooldown) if breaker else (0, 0.0, 0.0)
        )
        self.ttl = max(STATE_TTL, math.ceil(2 * self._breaker[2]))
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
            decode_responses=True,
        )
        #: The admissions and reports of this process's threads, one round trip for those
        #: of the same moment (a chunk's calls start and end together).
        self.batch = Coalescer(self.client)
        self._lock = threading.Lock()
        self._held: dict[str, list[str]] = {}  # origin -> leases of this process, oldest first
        self._probes: dict[str, str] = {}  # origin -> the lease of this process's probe
        self._me = (0, "")

    def close(self) -> None:
        self.client.close()

    def keys(self, origin: str) -> list[str]:
        """The origin's hash, flight set and disabled hash, and the set of origins."""
        p = self.prefix
        return [f"{p}origin:{origin}", f"{p}flight:{origin}", f"{p}disabled:{origin}", self.origins]

    # -- every attempt ------------------------------------------------------------------

    def admit(self, origin: str, endpoint: str, now: float) -> Admission:
        """One script on Redis's clock (``now`` is not used: hosts' clocks differ).

        Within :meth:`ride`, the first admission of the ride's endpoint was asked
        for ahead, with the worker's own writes: its answer is used instead.
        """
        ride = _riding.get()
        if ride is not None and ride.guard is self and ride.ahead is not None:
            ahead, ride.ahead = ride.ahead, None
            if (ahead.origin, ahead.endpoint) == (origin, endpoint) and ahead.reply is not None:
                return self._admission(origin, ahead.lease, _decoded(ahead.reply))
            self._drop(ahead)
        lease = self._lease_id()
        args = self._admit_args(origin, endpoint, lease)
        try:
            (reply,) = self.batch.run(lambda pipe: _ADMIT.queue(pipe, self.keys(origin), args))
        except redis.RedisError as exc:
            raise GuardUnavailable(
                f"the endpoint guard's Redis ({mask_url(self.url)}) did not answer: {exc}; "
                "nothing was sent"
            ) from exc
        return self._admission(origin, lease, reply)

    def _admit_args(self, origin: str, endpoint: str, lease: str) -> list[str | float]:
        failures, cooldown, _ = self._breaker
        rate = self.policy.rate_limit(origin)
        return [
            origin, endpoint, lease, self.lease, failures, cooldown,
            rate.per_second if rate else 0, rate.burst if rate else 0, rate.text if rate else "",
            self.policy.concurrency or 0, self.ttl,
        ]  # fmt: skip

    def _admission(self, origin: str, lease: str, reply: list[Any]) -> Admission:
        """What the admission script's ``reply`` means; an admitted lease is held."""
        verdict = reply[0]
        if verdict == "go":
            probe = bool(reply[1])
            with self._lock:
                if probe:
                    self._probes[origin] = lease
                else:
                    self._held.setdefault(origin, []).append(lease)
            return PROBE if probe else ADMITTED
        if verdict == "wait":
            wait, reason = float(reply[1]), str(reply[2])
            patience = _patience.get()
            if patience is not None and time.monotonic() + wait > patience[0]:
                raise EndpointBusy(
                    f"no slot at {origin} within the worker's endpoint_wait ({patience[1]:g} s): "
                    f"{reason}; nothing was sent, the call is deferred",
                    origin=origin,
                    retry_at=time.time() + wait,
                )
            return Admission("wait", wait=wait, reason=reason)
        if verdict == "open":
            return Admission("open", retry_at=float(reply[1]), reason=str(reply[2]))
        return _DISABLED

    def report(
        self, origin: str, endpoint: str, verdict: Verdict, now: float, *, probe: bool = False
    ) -> None:
        with self._lock:
            if probe:
                lease = self._probes.pop(origin, "")
            else:
                held = self._held.get(origin)
                lease = held.pop(0) if held else ""
                if not held:
                    self._held.pop(origin, None)
        failures, cooldown, max_cooldown = self._breaker
        args: list[str | float] = [
            origin, endpoint, verdict, lease, int(probe), failures, cooldown, max_cooldown,
            int(self.policy.disable_on_gone), self.ttl,
        ]  # fmt: skip
        ride = _riding.get()
        if ride is not None and ride.guard is self:  # goes with the worker's next writes
            ride.reports.append((self.keys(origin), args))
            return
        self._send_reports([(self.keys(origin), args)])

    def _send_reports(self, reports: Reports) -> None:
        try:
            self.batch.run(lambda pipe: queue_reports(pipe, reports))
        except redis.RedisError as exc:  # the lease ends by itself; the verdict is lost
            log.warning("the endpoint guard's Redis did not take a report: %s", exc)

    # -- riding along with a worker's writes ----------------------------------------------

    @contextlib.contextmanager
    def ride(self, url: str) -> Iterator[Ride]:
        """Within this block (a worker's call to ``url``), the guard's round trips may ride
        along with the worker's own writes to the same Redis: the call's admission asked
        ahead (:meth:`Ride.queue_admission`, then :meth:`Ride.admitted` with its reply),
        its report kept for the worker's next pipeline (:meth:`Ride.take_reports`).
        Whatever was not carried when the block ends is sent by the guard itself.
        """
        origin, endpoint = endpoint_key(url)
        ride = Ride(self, _Ahead(origin, endpoint, self._lease_id()))
        token = _riding.set(ride)
        try:
            yield ride
        finally:
            _riding.reset(token)
            if ride.ahead is not None:  # asked for and never used (a duplicate, an error)
                self._drop(ride.ahead)
            if ride.reports:
                self._send_reports(ride.reports)

    def _drop(self, ahead: _Ahead) -> None:
        """Give back the slot (and the probe) of an admission asked ahead and not used."""
        reply = None if ahead.reply is None else _decoded(ahead.reply)
        if not reply or reply[0] != "go":
            return  # nothing held (or no answer: the lease ends by itself)
        failures, cooldown, max_cooldown = self._breaker
        args: list[str | float] = [
            ahead.origin, ahead.endpoint, "neutral", ahead.lease, int(reply[1]), failures,
            cooldown, max_cooldown, int(self.policy.disable_on_gone), self.ttl,
        ]  # fmt: skip
        self._send_reports([(self.keys(ahead.origin), args)])

    # -- dispatcher.endpoints -------------------------------------------------------------

    def states(self, now: float) -> list[EndpointState]:
        try:
            seconds, micros = self.client.time()
            clock = seconds + micros / 1e6
            origins = cast(
                "list[tuple[str, float]]", self.client.zrange(self.origins, 0, -1, withscores=True)
            )
            with self.client.pipeline(transaction=False) as pipe:
                for origin, _ in origins:
                    state, flight, disabled, _ = self.keys(origin)
                    pipe.hgetall(state)
                    pipe.zcount(flight, f"({clock!r}", "+inf")
                    pipe.hgetall(disabled)
                replies = pipe.execute()
        except redis.RedisError as exc:
            raise self._unreachable(exc) from exc
        found, stale = [], []
        for i, (origin, touched) in enumerate(origins):
            fields, in_flight, disabled = replies[3 * i : 3 * i + 3]
            if not (fields or in_flight or disabled) and touched < clock - self.ttl:
                stale.append(origin)
                continue
            found.append(self._state(origin, fields, in_flight, sorted(disabled), clock))
        if stale:
            with contextlib.suppress(redis.RedisError):
                self.client.zrem(self.origins, *stale)
        return found

    def enable(self, endpoint: str) -> bool:
        try:
            return bool(self.client.hdel(self.keys(endpoint_key(endpoint)[0])[2], endpoint))
        except redis.RedisError as exc:
            raise self._unreachable(exc) from exc

    def reset(self, origin: str) -> bool:
        """Close the breaker, fill the bucket, enable every URL; attempts in flight stay counted."""
        state, _, disabled, origins = self.keys(origin)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.zscore(origins, origin)
                pipe.delete(state, disabled)
                seen, deleted = pipe.execute()
        except redis.RedisError as exc:
            raise self._unreachable(exc) from exc
        return seen is not None or deleted > 0

    def __repr__(self) -> str:
        return f"<RedisGuard {mask_url(self.url)}>"

    # -- helpers --------------------------------------------------------------------------

    def _lease_id(self) -> str:
        pid, name = self._me
        if pid != os.getpid():  # made again in a forked child
            pid = os.getpid()
            self._me = (pid, name := f"{socket.gethostname()}:{pid}")
        return f"{name}:{next(_lease_ids)}"

    def _state(
        self,
        origin: str,
        fields: dict[str, Any],
        in_flight: int,
        disabled: list[str],
        clock: float,
    ) -> EndpointState:
        policy = self.policy
        state = fields.get("state")
        breaker: Any = None
        if state is not None or "cooldown" in fields or policy.breaker is not None:
            breaker = state or "closed"
        shown_at = fields.get("retry_at") if breaker in ("open", "half-open") else None
        retry_at = None if shown_at is None else float(shown_at)
        if breaker == "open" and retry_at is not None and clock >= retry_at:
            breaker = "half-open"  # the next attempt is the probe
        cooldown = fields.get("cooldown") or (policy.breaker.cooldown if policy.breaker else None)
        rate = policy.rate_limit(origin)
        cap = fields.get("cap")
        return EndpointState(
            origin=origin,
            breaker=breaker,
            failures=int(fields.get("failures", 0)),
            retry_at=retry_at,
            cooldown=None if breaker is None or cooldown is None else float(cooldown),
            rate_limit=fields.get("rate") or (rate.text if rate else None),
            concurrency=int(cap) if cap else policy.concurrency,
            in_flight=in_flight,
            disabled=tuple(disabled),
        )

    def _unreachable(self, exc: redis.RedisError) -> GuardUnavailable:
        return GuardUnavailable(
            f"the endpoint guard's Redis ({mask_url(self.url)}) did not answer: {exc}"
        )
