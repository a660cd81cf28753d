"""Task states written the way Celery's Redis backend writes them, on a shared pipeline.

``backend.store_result`` costs two round trips a state (it reads the stored
state first, to never overwrite a ``SUCCESS``, then writes and publishes), and
a chunk of 100 calls writes 200 states. :class:`StateWriter` writes the same
bytes under the same key with the same expiry and the same publish, the
``SUCCESS`` check done by Redis itself (one script), queued on a pipeline with
the call's other writes: one round trip for all of them. It does so only for
Celery's own ``RedisBackend`` with JSON results and no compression, whose
encoding it reuses (``encode_result``, ``encode``, ``get_key_for_task``); any
other backend gets ``store_result`` (:func:`state_writer` returns ``None``).
``tests/test_result_writes.py`` checks that Celery reads back exactly what
``store_result`` would have stored, on the Celery installed.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import celery
from celery import states as celery_states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError

#: store(key, encoded state, seconds to keep it or 0): as Celery's store_result, a stored
#: SUCCESS is never overwritten. 1: stored, 0: left alone.
STORE_FUNCTION = """
local function store(key, payload, seconds)
  local current = redis.call('GET', key)
  if current then
    local ok, meta = pcall(cjson.decode, current)
    if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
      return 0
    end
  end
  if tonumber(seconds) > 0 then
    redis.call('SETEX', key, seconds, payload)
  else
    redis.call('SET', key, payload)
  end
  redis.call('PUBLISH', key, payload)
  return 1
end
"""


#: A task id that JSON writes as it is (every id dispatchkit makes is one).
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:-]+")


@dataclass(frozen=True, slots=True)
class Stored:
    """A task state as the backend stores it: its key, its bytes, its seconds to keep (0: ever)."""

    key: str | bytes
    payload: str | bytes
    seconds: int


class StateWriter:
    """Encodes a task's state as the backend stores it, for the ledger's scripts."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        # worker name -> (the stand-in id, STARTED of the stand-in): see started().
        self._started: dict[str | None, tuple[str, Stored]] = {}

    def started(self, task_id: str, hostname: str | None) -> Stored:
        """``STARTED`` of task ``task_id`` run by this process of worker ``hostname``.

        Its meta (``pid`` and ``hostname``) is the same for every task of the
        process, so it is encoded once, for a stand-in id, and each task's id
        takes the stand-in's place; an id that JSON would escape is encoded in full.
        """
        meta = {"pid": os.getpid(), "hostname": hostname}
        if not _PLAIN_ID.fullmatch(task_id):
            return self.encoded(task_id, meta, celery_states.STARTED)
        found = self._started.get(hostname)
        if found is None:
            stand_in = f"dispatchkit-started-{uuid.uuid4().hex}"
            found = self._started[hostname] = (
                stand_in,
                self.encoded(stand_in, meta, celery_states.STARTED),
            )
        stand_in, stored = found
        payload = stored.payload
        if isinstance(payload, bytes):
            payload = payload.replace(stand_in.encode(), task_id.encode())
        else:
            payload = payload.replace(stand_in, task_id)
        return Stored(self.backend.get_key_for_task(task_id), payload, stored.seconds)

    def encoded(self, task_id: str, value: Any, state: str) -> Stored:
        """``state`` (with its ``value``) of task ``task_id``, as ``store_result`` would store it.

        A value too large for Redis raises Celery's ``BackendStoreError``, as
        ``store_result`` does.
        """
        backend = self.backend
        meta = backend._get_result_meta(
            result=backend.encode_result(value, state), state=state, traceback=None, request=None
        )
        meta["task_id"] = task_id
        payload = backend.encode(meta)
        if len(payload) > backend._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        seconds = backend.expires
        if state == celery_states.FAILURE:  # result_failure_expires, where Celery has it
            seconds = getattr(backend, "failure_expires", seconds)
        return Stored(backend.get_key_for_task(task_id), payload, int(seconds or 0))


def state_writer(app: celery.Celery, ledger_url: str) -> StateWriter | None:
    """A writer for ``app``'s backend whose states the ledger (at ``ledger_url``) can store.

    ``None`` unless the backend is Celery's ``RedisBackend`` on that same Redis
    (same URL), with JSON results and no compression.
    """
    backend = app.backend
    if type(backend) is not RedisBackend:
        return None
    if backend.serializer != "json" or backend.compression:
        return None
    if str(app.conf.result_backend or "") != ledger_url:
        return None
    return StateWriter(backend)
