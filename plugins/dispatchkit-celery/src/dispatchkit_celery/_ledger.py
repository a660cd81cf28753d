"""The delivery ledger: every call under a durable schedule, until it ends, in Redis.

It also keeps the records of every call's attempts, and the dead letters.

Its keys, under ``dispatchkit:delivery:``:

* ``due``: a sorted set, task id -> when a poller must send the call's current
  attempt (unix seconds). While the call waits, that is its due time; once a
  message is sent, it is the time to send it again if no worker has taken it by
  then (the message was lost on its way: ``resend_after``); while an attempt
  runs, the call has no entry. While a poller sends an entry, its score is its
  claim (claim time plus the lease), so no other poller takes it, and it comes
  back by itself if that poller dies.
* ``call:<task id>``: a hash per call. ``state``: ``queued`` (the caller sent
  attempt 1), ``running`` (a worker took attempt ``attempt``: ``taken`` is the
  token of that message), ``waiting`` (for attempt ``attempt``, due at ``due``;
  it stays so once the poller has sent it, until a worker takes it) or
  ``done``. Until done it also holds ``call`` (the call's JSON), ``schedule``
  (the schedule's JSON) and ``queue``; ``error`` is the last failed
  attempt's error (``DispatchError.to_dict()``); ``duplicates`` counts the
  messages dropped because their attempt was taken or over; ``offset`` (a
  replayed call's) is the number of attempts the call made before its replay,
  so that its attempts go on numbering after them. A done call's hash expires
  with its result.
* ``attempts:<task id>``: a list, the record of each attempt of the call
  (``dispatchkit.Attempt.to_dict()`` as JSON), oldest first, whatever its
  schedule; it expires ``attempts_ttl`` seconds after the last one was added.
  The records of an attempt that failed and waits are added with the wait, those
  of a call's last attempt before its result is stored: whoever sees a result
  sees every record.
* ``dead`` and ``dead:<task id>``: the dead letters (see ``_dead_letters.py``).

Every message carries its attempt number and a token of its own. The first
message to take an attempt runs it; another copy of the same attempt (sent
again after ``resend_after``, or by a poller that died before it could note
the send) is dropped, and so is any message of an attempt that is over. The
copy that took it runs again only when the broker hands it back because its
worker died. Every write that moves a call on happens before the message that
carried it is acknowledged: a crash in between gives a duplicate message,
which this drops, never a lost call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT, KeyT

from dispatchkit_celery._coalesce import Coalescer, Script
from dispatchkit_celery._config import DEFAULT_ATTEMPTS_TTL
from dispatchkit_celery._results import STORE_FUNCTION, Stored

PREFIX = "dispatchkit:delivery:"
QUEUED = "queued"
RUNNING = "running"
WAITING = "waiting"
DONE = "done"

# KEYS[1]: the due set. ARGV: lease seconds, most entries. Claims the due entries by
# moving them to now + lease, on Redis's clock (one clock for every poller).
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local claim = now + tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', claim, id)
end
return {string.format('%.17g', claim), ids}
"""

# KEYS[1]: the due set. ARGV: task id, claim, seconds until a resend ('' to remove).
# Acts only if the entry still carries that claim: a worker that took or rescheduled the
# call meanwhile has removed it or given it a new score.
_RELEASE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
if ARGV[3] == '' then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS[1]: the due set, KEYS[1 + i]: call i's hash. ARGV: the schedule's JSON, the queue,
# when to send again; then each call's task id and JSON. A hash left by an earlier call of
# the same id goes: one script, so no worker sees it half written.
_ENQUEUE = Script(
    """
local due = tonumber(ARGV[3])
for i = 2, #KEYS do
  local id, call = ARGV[2 * i], ARGV[2 * i + 1]
  redis.call('DEL', KEYS[i])
  redis.call('HSET', KEYS[i], 'state', 'queued', 'attempt', 1, 'call', call,
             'schedule', ARGV[1], 'queue', ARGV[2])
  redis.call('ZADD', KEYS[1], due, id)
end
return #KEYS - 1
"""
)

# KEYS[1]: the call's hash, KEYS[2]: the due set. ARGV: attempt, token, task id.
# take() is the call's offset (>= 0) when the message may run its attempt, -1 when it is a
# duplicate.
_TAKE_FUNCTION = """
local function take()
  local state = redis.call('HGET', KEYS[1], 'state')
  if not state then
    return 0
  end
  local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
  local attempt = tonumber(ARGV[1])
  local recorded = tonumber(redis.call('HGET', KEYS[1], 'attempt'))
  if state ~= 'done' and recorded == attempt then
    local taken = redis.call('HGET', KEYS[1], 'taken')
    if not taken then
      redis.call('HSET', KEYS[1], 'state', 'running', 'taken', ARGV[2])
      redis.call('ZREM', KEYS[2], ARGV[3])
      return offset
    end
    if taken == ARGV[2] then
      return offset
    end
  elseif state ~= 'done' and recorded < attempt then
    return offset
  end
  redis.call('HINCRBY', KEYS[1], 'duplicates', 1)
  return -1
end
"""
_TAKE = Script(_TAKE_FUNCTION + "return take()\n")
# KEYS[1]: a task's key in the result backend. ARGV: its encoded state, seconds to keep it.
_STORE = Script(STORE_FUNCTION + "return store(KEYS[1], ARGV[1], ARGV[2])\n")
# The same, and when the message runs its attempt, the task's state (KEYS[3]: its key;
# ARGV 4 and 5: the encoded state and its seconds to keep) stored as _results writes it.
_TAKE_AND_STORE = Script(
    _TAKE_FUNCTION
    + STORE_FUNCTION
    + """
local offset = take()
if offset >= 0 then
  store(KEYS[3], ARGV[4], ARGV[5])
end
return offset
"""
)

# KEYS[1]: the call's hash, KEYS[2]: the due set. ARGV: attempt, seconds to keep, task id,
# offset ('' : any). A call replayed since (its offset changed) is a new round: left alone.
_FINISH_FUNCTION = """
local function finish()
  if ARGV[4] ~= '' then
    local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
    if offset ~= tonumber(ARGV[4]) then
      return 0
    end
  end
  redis.call('HSET', KEYS[1], 'state', 'done', 'attempt', ARGV[1])
  redis.call('HDEL', KEYS[1], 'call', 'schedule', 'queue', 'due', 'taken')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 1
end
"""
_FINISH = Script(_FINISH_FUNCTION + "return finish()\n")
# The task's state first (KEYS[3]: its key; ARGV 5 and 6: the encoded state and its seconds
# to keep), stored as _results writes it; the call is done only once its result is stored.
_STORE_AND_FINISH = Script(
    STORE_FUNCTION
    + _FINISH_FUNCTION
    + """
store(KEYS[3], ARGV[5], ARGV[6])
return finish()
"""
)


def taken_offset(reply: Any) -> int | None:
    """What a take script's ``reply`` says: the call's offset, ``None`` for a duplicate."""
    return None if int(reply) < 0 else int(reply)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Pending:
    """A call whose current attempt a poller must send."""

    task_id: str
    call: dict[str, Any]
    schedule: dict[str, Any]
    queue: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Claim:
    """The entries one poller claimed, and the score that marks them as its own."""

    score: str
    task_ids: list[str]


class Ledger:
    """The ledger on one Redis; safe to share between threads (redis-py pools connections).

    ``prefix`` names its keys (tests give each ledger a namespace of its own).
    """

    def __init__(self, url: str, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        #: The sorted set of calls to send, by when.
        self.due = prefix + "due"
        self.client = redis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=10, health_check_interval=30
        )
        self._claim = self.client.register_script(_CLAIM)
        self._release = self.client.register_script(_RELEASE)
        #: The writes of this process's threads, one round trip for those of the same moment.
        self.batch = Coalescer(self.client)

    def close(self) -> None:
        self.client.close()

    def call_key(self, task_id: str) -> str:
        """The key of the call's hash."""
        return f"{self.prefix}call:{task_id}"

    def attempts_key(self, task_id: str) -> str:
        """The key of the list of the call's attempt records."""
        return f"{self.prefix}attempts:{task_id}"

    def attempts(self, task_id: str) -> list[bytes | str]:
        """The records of the call's attempts, oldest first: ``Attempt.to_dict()`` each, as
        stored (JSON)."""
        records: list[bytes | str] = self.client.lrange(self.attempts_key(task_id), 0, -1)
        return records

    # -- the caller ---------------------------------------------------------------------

    def enqueue(
        self,
        task_id: str,
        call: dict[str, Any],
        schedule: dict[str, Any],
        queue: str,
        resend_after: float,
    ) -> None:
        """Record attempt 1 before its message is sent: sent again if no worker takes it."""
        self.enqueue_many([(task_id, call)], schedule, queue, resend_after)

    def enqueue_many(
        self,
        calls: Sequence[tuple[str, dict[str, Any]]],
        schedule: dict[str, Any],
        queue: str,
        resend_after: float,
    ) -> None:
        """:meth:`enqueue` for each (task id, call) of ``calls``, in one transaction."""
        if not calls:
            return
        keys = [self.due, *(self.call_key(task_id) for task_id, _ in calls)]
        args: list[EncodableT] = [json.dumps(schedule), queue, repr(time.time() + resend_after)]
        for task_id, call in calls:
            args += (task_id, json.dumps(call))
        self.batch.run(lambda pipe: _ENQUEUE.queue(pipe, keys, args))

    def forget(self, task_id: str) -> None:
        """Drop a call whose first message could not be sent (the caller got the error)."""
        self.forget_many([task_id])

    def forget_many(self, task_ids: Sequence[str]) -> None:
        """:meth:`forget` each of ``task_ids``, in one transaction."""
        if not task_ids:
            return
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(*(self.call_key(task_id) for task_id in task_ids))
            pipe.zrem(self.due, *task_ids)
            pipe.execute()

    # -- the worker -----------------------------------------------------------------

    def take(self, task_id: str, attempt: int, token: str) -> bool:
        """Whether the message ``token`` of attempt ``attempt`` runs it (else: a duplicate)."""
        return self.take_attempt(task_id, attempt, token) is not None

    def take_attempt(
        self, task_id: str, attempt: int, token: str, state: Stored | None = None
    ) -> int | None:
        """:meth:`take`: the call's offset when the message runs its attempt, else ``None``.

        The offset is what the call's attempt numbers start from (0 unless it was
        replayed). ``state`` (on this Redis) is stored in the same script if the
        message runs its attempt.
        """
        (reply,) = self.batch.run(lambda pipe: self.add_take(pipe, task_id, attempt, token, state))
        return taken_offset(reply)

    def add_take(
        self, pipe: Pipeline, task_id: str, attempt: int, token: str, state: Stored | None = None
    ) -> None:
        """Queue :meth:`take_attempt` on ``pipe``: its reply is the offset, or -1."""
        keys: list[KeyT] = [self.call_key(task_id), self.due]
        args: list[EncodableT] = [attempt, token, task_id]
        script = _TAKE
        if state is not None:
            script = _TAKE_AND_STORE
            keys.append(state.key)
            args += [state.payload, state.seconds]
        script.queue(pipe, keys, args)

    def record(self, task_id: str, records: Sequence[Mapping[str, Any]], ttl: float) -> None:
        """Add the records of attempts that ended; keep them ``ttl`` s after this."""
        if records:
            self.batch.run(lambda pipe: self.add_records(pipe, task_id, records, ttl))

    def add_records(
        self, pipe: Pipeline, task_id: str, records: Sequence[Mapping[str, Any]], ttl: float
    ) -> None:
        """Queue the writes of :meth:`record` on ``pipe`` (with the others of the moment)."""
        if records:
            key = self.attempts_key(task_id)
            pipe.rpush(key, *(json.dumps(record) for record in records))
            pipe.expire(key, max(1, int(ttl)))

    def wait(
        self,
        task_id: str,
        call: dict[str, Any],
        schedule: dict[str, Any],
        queue: str,
        attempt: int,
        due: float,
        error: dict[str, Any],
        records: Sequence[Mapping[str, Any]] = (),
        records_ttl: float = DEFAULT_ATTEMPTS_TTL,
    ) -> None:
        """Record that attempt ``attempt`` of the call is due at ``due``, durably.

        ``records`` (of the attempt that failed) are added in the same transaction.
        """
        key = self.call_key(task_id)
        fields: dict[FieldT, EncodableT] = {
            "state": WAITING,
            "attempt": attempt,
            "call": json.dumps(call),
            "schedule": json.dumps(schedule),
            "queue": queue,
            "due": repr(due),
            "error": json.dumps(error, default=str),
        }
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.hdel(key, "taken")
            pipe.persist(key)
            pipe.zadd(self.due, {task_id: due})
            self.add_records(pipe, task_id, records, records_ttl)
            pipe.execute()

    def finish(self, task_id: str, attempt: int, ttl: float, offset: int | None = None) -> bool:
        """Record that the call ended with attempt ``attempt``; forget it after ``ttl`` s.

        With ``offset`` (what :meth:`take_attempt` said), only if the call was not
        replayed since: a replay that came first started a round of its own.
        """
        (done,) = self.batch.run(lambda pipe: self.add_finish(pipe, task_id, attempt, ttl, offset))
        return bool(done)

    def store_state(self, pipe: Pipeline, state: Stored) -> None:
        """Queue the write of a task's state (see ``_results.py``) on ``pipe``."""
        _STORE.queue(pipe, [state.key], [state.payload, state.seconds])

    def add_finish(
        self,
        pipe: Pipeline,
        task_id: str,
        attempt: int,
        ttl: float,
        offset: int | None = None,
        state: Stored | None = None,
    ) -> None:
        """Queue :meth:`finish` on ``pipe`` (with the others of the moment).

        ``state`` (the call's result, on this Redis) is stored first, in the same script.
        """
        keys: list[KeyT] = [self.call_key(task_id), self.due]
        args: list[EncodableT] = [
            attempt,
            max(1, int(ttl)),
            task_id,
            "" if offset is None else offset,
        ]
        script = _FINISH
        if state is not None:
            script = _STORE_AND_FINISH
            keys.append(state.key)
            args += [state.payload, state.seconds]
        script.queue(pipe, keys, args)

    # -- the poller -------------------------------------------------------------------

    def claim(self, lease: float, limit: int) -> Claim:
        """Claim up to ``limit`` due calls for ``lease`` seconds."""
        score, ids = self._claim(keys=[self.due], args=[lease, limit])
        return Claim(_text(score), [_text(i) for i in ids])

    def pending(self, task_id: str) -> Pending | None:
        """The call ``task_id`` if its current attempt is to be sent (queued or waiting)."""
        state, call, schedule, queue, attempt = self.client.hmget(
            self.call_key(task_id), ["state", "call", "schedule", "queue", "attempt"]
        )
        if state is None or _text(state) not in (QUEUED, WAITING):
            return None
        if call is None or schedule is None or attempt is None:
            return None
        return Pending(
            task_id, json.loads(call), json.loads(schedule), _text(queue or b""), int(attempt)
        )

    def release(self, task_id: str, claim: Claim, resend_after: float | None) -> bool:
        """End the claim on ``task_id``: resend in ``resend_after`` s, or (``None``) drop it.

        Only if the entry still carries ``claim``.
        """
        again = "" if resend_after is None else repr(resend_after)
        return bool(self._release(keys=[self.due], args=[task_id, claim.score, again]))
