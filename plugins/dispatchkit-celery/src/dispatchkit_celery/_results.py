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

import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import celery
import orjson
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
        self._timezone = backend.app.timezone  # as app.now(): the clock in the app's timezone
        # (state, no current task) -> its meta cut at its slots (None: cannot be): see encoded().
        self._templates: dict[tuple[str, bool], _Template | None] = {}

    def encoded(self, task_id: str, value: Any, state: str, date_done: str | None = None) -> Stored:
        """``state`` (with its ``value``) of task ``task_id``, as ``store_result`` would store it.

        ``date_done`` (ISO 8601, in the app's timezone) is the clock's now for
        a ready state unless given. A value too large for Redis raises Celery's
        ``BackendStoreError``, as ``store_result`` does.

        The meta around the value is the same for every task of a state in a
        process (no request is passed, so no extended fields), so it is encoded
        once per state: each task's value, date and id fill its slots.
        :meth:`encoded_by_celery` is the reference this must equal, to the byte.
        """
        backend = self.backend
        result, date_done = backend.encode_result(value, state), self._dated(state, date_done)
        children = backend.current_task_children(None)
        template = None
        if not children and _PLAIN_ID.fullmatch(task_id):
            key = (state, children is None)
            if key not in self._templates:
                self._templates[key] = _template(backend, state, children)
            template = self._templates[key]
        if template is None:
            payload = self._payload(task_id, result, state, date_done)
        else:
            payload = template.filled(_fragment(backend, result), date_done, task_id)
        return self._stored(task_id, payload, state)

    def encoded_by_celery(
        self, task_id: str, value: Any, state: str, date_done: str | None = None
    ) -> Stored:
        """What :meth:`encoded` gives, made by Celery's own meta and encoding for this task."""
        result, date_done = self.backend.encode_result(value, state), self._dated(state, date_done)
        return self._stored(task_id, self._payload(task_id, result, state, date_done), state)

    def _dated(self, state: str, date_done: str | None) -> str | None:
        """``date_done`` as given, else the clock's now for a ready state (as ``app.now()``)."""
        if date_done is None and state in self.backend.READY_STATES:
            return datetime.now(self._timezone).isoformat()
        return date_done

    def _payload(self, task_id: str, result: Any, state: str, date_done: str | None) -> Any:
        backend = self.backend
        meta = backend._get_result_meta(result=result, state=state, traceback=None, request=None)
        meta["date_done"] = date_done
        meta["task_id"] = task_id
        return backend.encode(meta)

    def _stored(self, task_id: str, payload: str | bytes, state: str) -> Stored:
        backend = self.backend
        if len(payload) > backend._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        seconds = backend.expires
        if state == celery_states.FAILURE:  # result_failure_expires, where Celery has it
            seconds = getattr(backend, "failure_expires", seconds)
        return Stored(backend.get_key_for_task(task_id), payload, int(seconds or 0))


def _fragment(backend: RedisBackend, value: Any) -> str:
    """``value`` as the backend's JSON writes it. Kombu's JSON is the standard library's
    with a ``default`` for the types JSON lacks (datetime, UUID, Decimal, bytes, ...):
    a value of plain JSON types is written by the standard library alone, to the same
    text, and any other by kombu."""
    try:
        return json.dumps(value)
    except TypeError:
        return str(backend.encode(value))


#: Stand-ins for a template's slots: the value (any JSON), the date and the id (strings).
_SLOTS = ("dispatchkit-slot-result", "dispatchkit-slot-date", "dispatchkit-slot-id")


@dataclass(frozen=True, slots=True)
class _Template:
    """A state's encoded meta cut at its slots: ``pieces[0]``, a slot, ``pieces[1]``, ..."""

    pieces: tuple[str, ...]
    order: tuple[int, ...]  # which of _SLOTS each slot is, in the order they appear

    def filled(self, result: str, date_done: str | None, task_id: str) -> str:
        # The date is ISO 8601 and the id plain: JSON writes both as they are.
        values = (result, "null" if date_done is None else f'"{date_done}"', f'"{task_id}"')
        out = [self.pieces[0]]
        for slot, piece in zip(self.order, self.pieces[1:], strict=True):
            out.append(values[slot])
            out.append(piece)
        return "".join(out)


def _template(backend: RedisBackend, state: str, children: list[Any] | None) -> _Template | None:
    """``state``'s meta encoded once, cut at its slots; ``None`` when it cannot be cut."""
    meta = backend._get_result_meta(result=_SLOTS[0], state=state, traceback=None, request=None)
    meta["children"] = children
    meta["date_done"] = _SLOTS[1] if state in backend.READY_STATES else None
    meta["task_id"] = _SLOTS[2]
    payload = backend.encode(meta)
    if not isinstance(payload, str):
        return None
    cut = re.split(f'"({"|".join(_SLOTS)})"', payload)
    pieces, names = tuple(cut[::2]), cut[1::2]
    expected = [_SLOTS[0], _SLOTS[2]] + ([_SLOTS[1]] if meta["date_done"] else [])
    if sorted(names) != sorted(expected):
        return None  # a slot went missing or came twice: not a meta this can fill
    return _Template(pieces, tuple(_SLOTS.index(name) for name in names))


#: How every SUCCESS that Celery's Redis backend stores as JSON begins.
_SUCCESS_PREFIX = b'{"status": "SUCCESS", '


def read_meta(backend: Any, task_id: str) -> dict[str, Any]:
    """``backend.get_task_meta(task_id)``, with less work for a ``SUCCESS`` in Redis.

    With Celery's ``RedisBackend``, JSON and no compression (:func:`lean`), a
    stored ``SUCCESS`` is parsed by orjson: a success carries no exception to
    rebuild, and one without kombu's tagged values (``"__type__"``) parses as
    kombu would. Anything else, or a read that failed (with Celery's retries,
    where configured), is Celery's own ``get_task_meta``.
    """
    if not lean(backend):
        return dict(backend.get_task_meta(task_id))
    try:
        raw = backend.get(backend.get_key_for_task(task_id))
    except Exception:
        return dict(backend.get_task_meta(task_id))
    return _meta(backend, raw)


def lean(backend: Any) -> bool:
    """Whether ``backend`` is Celery's ``RedisBackend`` with JSON and no compression: the
    backend whose states :class:`StateWriter` writes and :func:`read_meta` and
    :class:`ReadAhead` read."""
    return (
        type(backend) is RedisBackend and backend.serializer == "json" and not backend.compression
    )


def _meta(backend: RedisBackend, raw: Any) -> dict[str, Any]:
    """The meta stored as ``raw`` (``None``: nothing stored), as ``get_task_meta`` reads it."""
    if not raw:
        return {"status": celery_states.PENDING, "result": None}
    return _success(raw) or dict(backend.decode_result(raw))


def _success(raw: Any) -> dict[str, Any] | None:
    """``raw``'s meta if it is a ``SUCCESS`` orjson reads as kombu would; else ``None``."""
    if isinstance(raw, bytes) and raw.startswith(_SUCCESS_PREFIX) and b'"__type__"' not in raw:
        try:
            meta = orjson.loads(raw)
        except orjson.JSONDecodeError:  # what orjson refuses (NaN, huge ints): kombu's
            return None
        if isinstance(meta, dict) and meta.get("status") == celery_states.SUCCESS:
            return meta
    return None


#: The most results one read of a :class:`ReadAhead` asks for, and the first count.
READ_AHEAD_MAX = 256
READ_AHEAD_FIRST = 16
#: Seconds a :class:`ReadAhead` lets pass before it asks again for a result it found
#: not done (the first pause of ``CeleryResult.get`` between two reads).
READ_AHEAD_PAUSE = 0.002


class ReadAhead:
    """The results of one batch (``ids``, in order), read in bulk.

    A read for a result asks for it and for the next ones not found done yet,
    in one ``MGET``; the successes found wait here for their own read. A result
    found not done is asked for again only :data:`READ_AHEAD_PAUSE` later, so
    a caller right behind the workers reads what they finished meanwhile in
    one round trip instead of one by one as each finishes. Twice as many are
    asked for next time while most were done, half as many while few were.
    Keeping a ``SUCCESS`` is safe: the backend never overwrites one.
    Thread-safe; for :func:`lean` backends only.
    """

    def __init__(self, backend: RedisBackend, ids: Sequence[str]) -> None:
        self._backend = backend
        self._ids = list(ids)
        self._position = {task_id: i for i, task_id in enumerate(self._ids)}
        self._found: dict[str, dict[str, Any]] = {}
        self._missed: dict[str, float] = {}  # id -> when a read found it not done
        self._ahead = READ_AHEAD_FIRST
        self._lock = threading.Lock()

    def meta(self, task_id: str) -> dict[str, Any] | None:
        """``task_id``'s meta, read ahead or now (with the next ones); ``None``: read it
        alone (not of this batch, or the bulk read failed)."""
        with self._lock:
            found = self._found.pop(task_id, None)
            if found is not None:
                return found
            at = self._position.get(task_id)
            if at is None:
                return None
            missed = self._missed.pop(task_id, None)
            asked = [task_id]
            ids, found, ahead = self._ids, self._found, self._ahead
            for next_at in range(at + 1, len(ids)):  # no slice: a batch may be 100,000 long
                if len(asked) >= ahead:
                    break
                if ids[next_at] not in found:
                    asked.append(ids[next_at])
        if missed is not None:
            time.sleep(
                max(0.0, min(READ_AHEAD_PAUSE, missed + READ_AHEAD_PAUSE - time.monotonic()))
            )
        backend = self._backend
        try:
            raws = backend.client.mget([backend.get_key_for_task(one) for one in asked])
        except Exception:
            return None
        now = time.monotonic()
        with self._lock:
            done = 0
            for one, raw in zip(asked[1:], raws[1:], strict=True):
                meta = _success(raw)
                if meta is None:
                    self._missed[one] = now
                else:
                    self._found[one] = meta
                    self._missed.pop(one, None)
                    done += 1
            if len(asked) > 1:
                more = 2 * done >= len(asked) - 1
                ahead = self._ahead * 2 if more else self._ahead // 2
                self._ahead = min(max(ahead, READ_AHEAD_FIRST), READ_AHEAD_MAX)
        return _meta(backend, raws[0])


def state_writer(app: celery.Celery, ledger_url: str) -> StateWriter | None:
    """A writer for ``app``'s backend whose states the ledger (at ``ledger_url``) can store.

    ``None`` unless the backend is Celery's ``RedisBackend`` on that same Redis
    (same URL), with JSON results and no compression.
    """
    backend = app.backend
    if not lean(backend) or str(app.conf.result_backend or "") != ledger_url:
        return None
    return StateWriter(backend)
