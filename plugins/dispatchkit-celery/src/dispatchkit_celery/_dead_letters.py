"""Dead letters: calls whose durable schedule ran out, kept to be looked at, replayed or purged.

A call is a dead letter when its last attempt failed in a way the schedule
retries (a connect error, a timeout, 408, 425, 429, a 5xx...) and no wait was
left. A final answer (the task's own failure, a 404, an invalid envelope) or an
error for which nothing was sent is not one: trying again would change nothing.

Two kinds of keys, beside the ledger's (``dispatchkit:delivery:``):

* ``dead``: a sorted set, task id -> when the call died (unix seconds).
* ``dead:<task id>``: a hash per dead letter: ``call`` (the call's JSON,
  without the headers that look like credentials; ``dropped`` lists their
  names), ``schedule`` (its JSON), ``queue``, ``origin``, ``error`` (the last
  attempt's, ``DispatchError.to_dict()``), ``died`` and ``attempts`` (the number
  of the last attempt). The records of the attempts stay in the ledger's
  ``attempts:<task id>`` list, kept as long as the dead letter.

The worker writes both, with the last attempt's record, in one transaction
before the call's result is stored. A dead letter is kept ``dead_letter_ttl``
seconds (a worker setting; ``None``: until replayed or purged). Replaying one
is decided in Redis: one Lua script removes it from the dead set and records
the call as queued in the ledger, so of two replays of one id, one sends it and
the other finds nothing to replay.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from dispatchkit import Attempt, Call, DispatchError, UsageError
from dispatchkit._checks import iterate
from dispatchkit._endpoints import endpoint_key
from dispatchkit._redact import MASK, SECRET_NAME, mask_url
from dispatchkit.exceptions import error_from_dict
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery._schedule import DEFAULT_RESEND_AFTER
from dispatchkit_celery._wire import send_call

if TYPE_CHECKING:
    from dispatchkit_celery._executor import CeleryResult

log = logging.getLogger("dispatchkit.celery")

#: Headers never kept in a dead letter, whatever their name says.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
#: Dead letters read from Redis per round trip.
_CHUNK = 100

# KEYS[1]: the dead set, KEYS[2]: the dead letter, KEYS[3]: the call's hash in the ledger,
# KEYS[4]: the due set. ARGV: dead task id, its 'died' as read, task id to send it as, call,
# schedule, queue, offset, seconds until a resend. Returns 1 to the one replay that takes
# it; 0 when it is not (or no longer) that dead letter.
_REPLAY = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('HGET', KEYS[2], 'died') ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[3], 'state', 'queued', 'attempt', 1, 'call', ARGV[4],
           'schedule', ARGV[5], 'queue', ARGV[6], 'offset', ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[8]), ARGV[3])
return 1
"""

# KEYS[1]: the dead set, KEYS[2]: the dead letter. ARGV: task id. Forgets an entry whose
# hash has expired, unless the call died again meanwhile.
_PRUNE = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS[1]: the dead set, KEYS[2]: the dead letter, KEYS[3]: its attempts. ARGV: task id.
_PURGE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""


def dead_key(ledger: Ledger) -> str:
    """The sorted set of dead letters, by when they died."""
    return ledger.prefix + "dead"


def letter_key(ledger: Ledger, task_id: str) -> str:
    """The hash of one dead letter."""
    return f"{ledger.prefix}dead:{task_id}"


def credential_header(name: str) -> bool:
    """Whether a header of this name may carry a credential (never kept in a dead letter)."""
    return name.lower() in _CREDENTIAL_HEADERS or bool(SECRET_NAME.search(name))


@contextlib.contextmanager
def ledger_errors(what: str) -> Iterator[None]:
    """Translate Redis's errors while reading or changing the ledger for a caller."""
    try:
        yield
    except redis.RedisError as exc:
        raise DispatchError(f"cannot {what}: the delivery ledger's Redis: {exc}") from exc


# -- the worker -------------------------------------------------------------------------


def bury(
    ledger: Ledger,
    task_id: str,
    call: Mapping[str, Any],
    schedule: Mapping[str, Any],
    queue: str,
    number: int,
    error: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    attempts_ttl: float,
    ttl: float | None,
) -> None:
    """Keep the call as a dead letter, with the records of its last attempt, in one transaction."""
    headers = dict(call.get("headers") or {})
    dropped = sorted(name for name in headers if credential_header(name))
    kept = {name: value for name, value in headers.items() if name not in dropped}
    try:
        origin = endpoint_key(str(call.get("url")))[0]
    except UsageError:
        origin = ""
    now = time.time()
    key, attempts = letter_key(ledger, task_id), ledger.attempts_key(task_id)
    dead = dead_key(ledger)
    with ledger.client.pipeline(transaction=True) as pipe:
        ledger.add_records(pipe, task_id, records, attempts_ttl)
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                "call": json.dumps({**call, "headers": kept or None}),
                "schedule": json.dumps(schedule),
                "queue": queue,
                "origin": origin,
                "error": json.dumps(error, default=str),
                "died": repr(now),
                "attempts": number,
                "dropped": json.dumps(dropped),
            },
        )
        if ttl is None:
            pipe.persist(attempts)
        else:
            pipe.expire(key, max(1, int(ttl)))
            pipe.expire(attempts, max(1, int(max(ttl, attempts_ttl))))
            pipe.zremrangebyscore(dead, "-inf", now - ttl)  # those whose hash has expired
        pipe.zadd(dead, {task_id: now})
        pipe.execute()


# -- the caller -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A call whose retry schedule ran out on failures worth retrying.

    ``call`` is the call as it will be replayed: its URL as given (masked only
    where it is shown: ``repr``, :meth:`to_dict`), its arguments, and its
    headers except those that may hold credentials (``Authorization``,
    ``Cookie``, any name with ``auth``, ``token``, ``key``, ``secret``, ``sig``,
    ``session``...), whose names are in ``dropped_headers``. ``died`` is when the
    last attempt failed (unix seconds), ``error`` that attempt's error,
    ``attempts`` the records of every attempt of the call, oldest first.
    """

    task_id: str
    call: Call
    died: float
    error: DispatchError = field(compare=False)
    attempts: tuple[Attempt, ...]
    origin: str
    queue: str
    dropped_headers: tuple[str, ...] = ()

    @property
    def died_at(self) -> datetime:
        """``died`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.died, timezone.utc)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, to be shown: the URL and secret-looking arguments masked."""
        call = self.call
        return {
            "task_id": self.task_id,
            "died": self.died_at.isoformat(timespec="microseconds"),
            "origin": self.origin,
            "queue": self.queue,
            "method": call.method,
            "url": mask_url(call.url),
            "arguments": {
                name: MASK if SECRET_NAME.search(str(name)) else value
                for name, value in call.kwargs.items()
            },
            "json": call.json,
            "timeout": call.timeout,
            "headers": dict(call.headers or {}),
            "dropped_headers": list(self.dropped_headers),
            "error": {
                "type": type(self.error).__name__,
                "message": str(self.error),
                "status": getattr(self.error, "status", None),
            },
            "attempts": [attempt.to_dict() for attempt in self.attempts],
        }

    def __repr__(self) -> str:
        return (
            f"<DeadLetter {self.task_id} {self.call.method} {mask_url(self.call.url)} "
            f"died {self.died_at:%Y-%m-%d %H:%M:%S} UTC after {len(self.attempts)} attempt(s): "
            f"{type(self.error).__name__}>"
        )


class DeadLetters:
    """The dead letters of one ledger: list, look at, replay and purge them.

    Reach them with ``dispatchkit_celery.dead_letters(dispatcher)``; replays are
    sent through the dispatcher's Celery app, each to the queue its call came by.
    A Redis error is raised as a ``DispatchError``.
    """

    def __init__(
        self, app: Celery, ledger: Callable[[], Ledger], result: Callable[[str], CeleryResult]
    ) -> None:
        self._app = app
        self._ledger = ledger
        self._result = result

    def list(
        self,
        origin: str | None = None,
        since: float | datetime | None = None,
        limit: int | None = 100,
    ) -> builtins.list[DeadLetter]:
        """The dead letters, newest first, at most ``limit`` (``None``: all).

        ``origin`` (any URL: its scheme, host and port count) keeps those of that
        origin; ``since`` (unix seconds, or a datetime: naive is UTC) those that
        died then or later.
        """
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise UsageError(f"limit must be a whole number or None, got {limit!r}")
        wanted = _origin(origin)
        low = "-inf" if since is None else repr(_timestamp(since))
        found: builtins.list[DeadLetter] = []
        with ledger_errors("list the dead letters"):
            ledger = self._ledger()
            ids = _ids(ledger.client.zrevrangebyscore(dead_key(ledger), "+inf", low))
            for start in range(0, len(ids), _CHUNK):
                for letter in self._load(ledger, ids[start : start + _CHUNK]):
                    if limit is not None and len(found) >= limit:
                        return found
                    if wanted is None or letter.origin == wanted:
                        found.append(letter)
        return found

    def get(self, task_id: str) -> DeadLetter | None:
        """The dead letter ``task_id``; ``None`` if there is none (any more)."""
        task_id = checked_task_id(task_id)
        with ledger_errors(f"read dead letter {task_id}"):
            ledger = self._ledger()
            return next(iter(self._load(ledger, [task_id])), None)

    def replay(
        self, ids: Iterable[str], new_id: bool = False
    ) -> builtins.list[CeleryResult | None]:
        """Send each dead letter of ``ids`` again, on a fresh schedule; one handle per id.

        The call keeps its task id (the receiver sees the same ``Idempotency-Key``)
        unless ``new_id``: then it gets a fresh one, and the handle's ``id`` says
        which. Its attempts go on numbering after the old ones, which stay. An id
        that is not a dead letter (replayed already, purged, expired, unknown)
        gives ``None``: nothing is sent, so replaying twice sends once.
        """
        wanted = task_ids(ids, "replay")
        with ledger_errors("replay dead letters"):
            ledger = self._ledger()
            return [self._replay_one(ledger, task_id, new_id) for task_id in wanted]

    def replay_all(
        self, origin: str | None = None, new_id: bool = False
    ) -> builtins.list[CeleryResult]:
        """Replay every dead letter (of ``origin``, if given), oldest first; their handles."""
        replayed = []
        for task_id in self._ids(origin):
            with ledger_errors("replay dead letters"):
                result = self._replay_one(self._ledger(), task_id, new_id)
            if result is not None:
                replayed.append(result)
        return replayed

    def purge(self, ids: Iterable[str]) -> builtins.list[str]:
        """Delete the dead letters ``ids`` and their attempts; return the ids that were there."""
        ids = task_ids(ids, "purge")
        with ledger_errors("purge dead letters"):
            ledger = self._ledger()
            script = ledger.client.register_script(_PURGE)
            dead = dead_key(ledger)
            return [
                task_id
                for task_id in ids
                if script(
                    keys=[dead, letter_key(ledger, task_id), ledger.attempts_key(task_id)],
                    args=[task_id],
                )
            ]

    def purge_all(self, origin: str | None = None) -> builtins.list[str]:
        """Delete every dead letter (of ``origin``, if given); return their ids."""
        return self.purge(self._ids(origin))

    # -- inside ---------------------------------------------------------------------

    def _ids(self, origin: str | None) -> builtins.list[str]:
        """The ids of the dead letters (of ``origin``), oldest first."""
        wanted = _origin(origin)
        with ledger_errors("list the dead letters"):
            ledger = self._ledger()
            ids = _ids(ledger.client.zrange(dead_key(ledger), 0, -1))
            if wanted is None:
                return ids
            with ledger.client.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    pipe.hget(letter_key(ledger, task_id), "origin")
                origins = pipe.execute()
        return [i for i, o in zip(ids, origins, strict=True) if o and _text(o) == wanted]

    def _load(self, ledger: Ledger, ids: Sequence[str]) -> builtins.list[DeadLetter]:
        """The dead letters of ``ids`` that are there, in order; the expired are forgotten."""
        with ledger.client.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(letter_key(ledger, task_id))
                pipe.lrange(ledger.attempts_key(task_id), 0, -1)
            replies = pipe.execute()
        letters, gone = [], []
        for task_id, raw, records in zip(ids, replies[::2], replies[1::2], strict=True):
            if not raw:
                gone.append(task_id)
                continue
            letters.append(_letter(task_id, {_text(k): _text(v) for k, v in raw.items()}, records))
        prune = ledger.client.register_script(_PRUNE)
        for task_id in gone:
            prune(keys=[dead_key(ledger), letter_key(ledger, task_id)], args=[task_id])
        return letters

    def _replay_one(self, ledger: Ledger, task_id: str, new_id: bool) -> CeleryResult | None:
        stored = ledger.client.hgetall(letter_key(ledger, task_id))
        raw = {_text(k): _text(v) for k, v in stored.items()}
        if "call" not in raw:
            return None
        sent_as = uuid.uuid4().hex if new_id else task_id
        try:
            call, schedule = json.loads(raw["call"]), json.loads(raw["schedule"])
            call["task_id"] = sent_as
            offset = 0 if new_id else int(raw.get("attempts") or 0)
            resend_after = float(schedule.get("resend_after", DEFAULT_RESEND_AFTER))
            died, queue = raw["died"], raw["queue"]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise DispatchError(f"dead letter {task_id} is unreadable: {exc!r}") from exc
        replay = ledger.client.register_script(_REPLAY)
        keys = [dead_key(ledger), letter_key(ledger, task_id), ledger.call_key(sent_as), ledger.due]
        args: list[str | int | float] = [
            task_id, died, sent_as, json.dumps(call), raw["schedule"], queue, offset, resend_after,
        ]  # fmt: skip
        if not replay(keys=keys, args=args):
            return None  # another replay took it first, or it was purged meanwhile
        try:
            # The old round's FAILURE must not answer for the new one.
            self._app.backend.forget(sent_as)
            send_call(self._app, call, 1, schedule, task_id=sent_as, queue=queue or None)
        except Exception as exc:  # the broker's or the backend's: the ledger holds the call
            log.warning(
                "task %s: replay recorded, its message not sent (%s): a worker's poller sends "
                "it within %gs", sent_as, exc, resend_after,
            )  # fmt: skip
        log.info("dead letter %s replayed as %s", task_id, sent_as)
        return self._result(sent_as)


def _letter(task_id: str, raw: Mapping[str, str], records: Sequence[bytes | str]) -> DeadLetter:
    try:
        return DeadLetter(
            task_id=task_id,
            call=Call.from_dict(json.loads(raw["call"])),
            died=float(raw["died"]),
            error=error_from_dict(json.loads(raw["error"])),
            attempts=tuple(Attempt.from_dict(json.loads(record)) for record in records),
            origin=raw.get("origin", ""),
            queue=raw.get("queue", ""),
            dropped_headers=tuple(json.loads(raw.get("dropped", "[]"))),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DispatchError(f"dead letter {task_id} is unreadable: {exc}") from exc


def checked_task_id(task_id: object) -> str:
    """``task_id`` if it is one (a non-empty str); else a ``UsageError``."""
    if not isinstance(task_id, str) or not task_id:
        raise UsageError(f"a task id is a non-empty str, got {task_id!r}")
    return task_id


def task_ids(ids: Iterable[str], what: str) -> builtins.list[str]:
    """The task ids of ``ids``, a list of them (not one str); else a ``UsageError``."""
    if isinstance(ids, (str, bytes)):
        raise UsageError(f"{what} takes a list of task ids, not a single string: [{ids!r}]")
    return [checked_task_id(one) for one in iterate(ids, f"{what} takes a list of task ids")]


def _origin(origin: object) -> str | None:
    """The origin key of ``origin`` (any URL), ``None`` for none; else a ``UsageError``."""
    if origin is None:
        return None
    if not isinstance(origin, str):
        raise UsageError(f"origin must be a URL (str), got {origin!r}")
    return endpoint_key(origin)[0]


def _timestamp(since: float | datetime) -> float:
    if isinstance(since, datetime):
        if since.tzinfo is None:
            since = since.replace(tzinfo=timezone.utc)
        return since.timestamp()
    if isinstance(since, bool) or not isinstance(since, (int, float)):
        raise UsageError(f"since must be unix seconds or a datetime, got {since!r}")
    return float(since)


def _ids(members: Any) -> builtins.list[str]:
    """The members of a sorted set as read (bytes), as text."""
    return [_text(member) for member in members]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
