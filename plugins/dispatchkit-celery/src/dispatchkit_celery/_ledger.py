"""The delivery ledger: every call under a durable schedule, until it ends, in Redis.

Two kinds of keys, under ``dispatchkit:delivery:``:

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
  messages dropped because their attempt was taken or over. A done call's hash
  expires with its result. The records of each attempt will have their place
  here too, as field ``attempts``.

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
from dataclasses import dataclass
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

PREFIX = "dispatchkit:delivery:"
QUEUED = "queued"
RUNNING = "running"
WAITING = "waiting"
DONE = "done"
#: Fields a done call no longer needs.
_LIVE_FIELDS = ("call", "schedule", "queue", "due", "taken")

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

# KEYS[1]: the call's hash, KEYS[2]: the due set. ARGV: attempt, token, task id.
# Returns 1 when the message may run its attempt, 0 when it is a duplicate.
_TAKE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 1
end
local attempt = tonumber(ARGV[1])
local recorded = tonumber(redis.call('HGET', KEYS[1], 'attempt'))
if state ~= 'done' and recorded == attempt then
  local taken = redis.call('HGET', KEYS[1], 'taken')
  if not taken then
    redis.call('HSET', KEYS[1], 'state', 'running', 'taken', ARGV[2])
    redis.call('ZREM', KEYS[2], ARGV[3])
    return 1
  end
  if taken == ARGV[2] then
    return 1
  end
elseif state ~= 'done' and recorded < attempt then
  return 1
end
redis.call('HINCRBY', KEYS[1], 'duplicates', 1)
return 0
"""


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
        self._take = self.client.register_script(_TAKE)

    def close(self) -> None:
        self.client.close()

    def call_key(self, task_id: str) -> str:
        """The key of the call's hash."""
        return f"{self.prefix}call:{task_id}"

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
        fields: dict[FieldT, EncodableT] = {
            "state": QUEUED,
            "attempt": 1,
            "call": json.dumps(call),
            "schedule": json.dumps(schedule),
            "queue": queue,
        }
        key = self.call_key(task_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=fields)
            pipe.zadd(self.due, {task_id: time.time() + resend_after})
            pipe.execute()

    def forget(self, task_id: str) -> None:
        """Drop a call whose first message could not be sent (the caller got the error)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.call_key(task_id))
            pipe.zrem(self.due, task_id)
            pipe.execute()

    # -- the worker -----------------------------------------------------------------

    def take(self, task_id: str, attempt: int, token: str) -> bool:
        """Whether the message ``token`` of attempt ``attempt`` runs it (else: a duplicate)."""
        return bool(
            self._take(keys=[self.call_key(task_id), self.due], args=[attempt, token, task_id])
        )

    def wait(
        self,
        task_id: str,
        call: dict[str, Any],
        schedule: dict[str, Any],
        queue: str,
        attempt: int,
        due: float,
        error: dict[str, Any],
    ) -> None:
        """Record that attempt ``attempt`` of the call is due at ``due``, durably."""
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
            pipe.execute()

    def finish(self, task_id: str, attempt: int, ttl: float) -> None:
        """Record that the call ended with attempt ``attempt``; forget it after ``ttl`` s."""
        key = self.call_key(task_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"state": DONE, "attempt": attempt})
            pipe.hdel(key, *_LIVE_FIELDS)
            pipe.expire(key, max(1, int(ttl)))
            pipe.zrem(self.due, task_id)
            pipe.execute()

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
