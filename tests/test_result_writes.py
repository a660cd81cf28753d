"""The worker's own writes of task states, against Celery's ``store_result``; group commit.

A worker writes a call's states (``STARTED``, ``RETRY``, the result) through
the ledger's scripts (``dispatchkit_celery._results``) instead of the result
backend's ``store_result``, to share round trips. These tests prove that
Celery cannot tell the difference, on the Celery installed: for every state,
the same stored meta, the same expiry, the same publish (a waiting ``get()``
wakes), the same refusal to overwrite a ``SUCCESS``. And that the coalescer
gives each thread its own replies and errors, in fewer round trips than
threads. Real Redis, database 4 (this module's own); no worker process.
"""

from __future__ import annotations

import datetime
import decimal
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import celery
import pytest
import redis
from celery.exceptions import BackendStoreError
from dispatchkit_celery._app import make_app
from dispatchkit_celery._coalesce import Coalescer
from dispatchkit_celery._executor import CeleryResult
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery._results import ReadAhead, StateWriter, read_meta, state_writer
from dispatchkit_celery._wire import CarriedError, Waiting
from dispatchkit_celery.testing import REDIS_URL

from dispatchkit import DispatchTimeout, states
from support.celery_env import ledger_on, redis_db

URL = urlunsplit(urlsplit(REDIS_URL)._replace(path="/4"))

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with redis_db(URL) as found:
        yield found


@pytest.fixture
def app(url: str) -> Iterator[celery.Celery]:
    made = make_app(url)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    with ledger_on(url) as opened:
        yield opened


def writer_of(app: celery.Celery, url: str) -> StateWriter:
    found = state_writer(app, url)
    assert found is not None
    return found


def write(ledger: Ledger, writer: StateWriter, task_id: str, value: Any, state: str) -> None:
    stored = writer.encoded(task_id, value, state)
    ledger.batch.run(lambda pipe: ledger.store_state(pipe, stored))


def celery_store(app: celery.Celery, task_id: str, value: Any, state: str) -> None:
    """Celery's own ``store_result`` (which calls redis-py's deprecated ``setex``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        app.backend.store_result(task_id, value, state)


def new_ids() -> tuple[str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4())


def seen(app: celery.Celery, task_id: str) -> dict[str, Any]:
    """What Celery reads of ``task_id``, less what differs by nature (the id, the clock)."""
    meta = dict(app.backend.get_task_meta(task_id))
    assert meta.pop("task_id") == task_id
    done = meta.pop("date_done")
    meta["date_done"] = type(done).__name__  # set (a str or a datetime) for ready states only
    result = meta.get("result")
    if isinstance(result, BaseException):
        meta["result"] = (type(result), result.args)
    return meta


def raw_meta(client: redis.Redis, app: celery.Celery, task_id: str) -> tuple[set[str], int]:
    """The stored JSON's fields and the key's seconds to live."""
    import json

    key = app.backend.get_key_for_task(task_id)
    payload = client.get(key)
    assert payload is not None
    return set(json.loads(payload)), int(client.ttl(key))


VALUES: list[tuple[str, Any]] = [
    (states.STARTED, {"pid": 4242, "hostname": "w1@host"}),
    ("RETRY", Waiting(1_900_000_000.5, 3)),
    (states.SUCCESS, 100),
    (states.SUCCESS, {"nested": [1, "two", None, 3.5]}),
    (states.SUCCESS, None),
    (states.FAILURE, CarriedError('{"type": "HTTPStatusError", "message": "503"}')),
]


IDS = [f"{state}-{i}" for i, (state, _) in enumerate(VALUES)]


@pytest.mark.parametrize(("state", "value"), VALUES, ids=IDS)
def test_a_state_reads_back_as_store_result_stores_it(
    app: celery.Celery, ledger: Ledger, url: str, state: str, value: Any
) -> None:
    ours, celerys = new_ids()
    write(ledger, writer_of(app, url), ours, value, state)
    celery_store(app, celerys, value, state)
    assert seen(app, ours) == seen(app, celerys)
    fields, ttl = raw_meta(ledger.client, app, ours)
    their_fields, their_ttl = raw_meta(ledger.client, app, celerys)
    assert fields == their_fields
    assert abs(ttl - their_ttl) <= 2
    assert ttl > 0
    mine, theirs = app.AsyncResult(ours), app.AsyncResult(celerys)
    assert (mine.state, mine.ready(), mine.traceback) == (
        theirs.state,
        theirs.ready(),
        theirs.traceback,
    )


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), uuid.uuid4().hex, 'odd "id" \u00e9'])
def test_started_reads_back_as_store_result_stores_it(
    app: celery.Celery, ledger: Ledger, url: str, task_id: str
) -> None:
    writer = writer_of(app, url)
    meta = {"pid": os.getpid(), "hostname": "w1@host"}
    writer.encoded(str(uuid.uuid4()), meta, states.STARTED)  # the state's template, made before
    stored = writer.encoded(task_id, meta, states.STARTED)
    assert stored == writer.encoded_by_celery(task_id, meta, states.STARTED)  # to the byte
    ledger.batch.run(lambda pipe: ledger.store_state(pipe, stored))
    theirs = str(uuid.uuid4())
    celery_store(app, theirs, meta, states.STARTED)
    assert seen(app, task_id) == seen(app, theirs)
    assert app.AsyncResult(task_id).info == meta
    other = {**meta, "hostname": "w2@host"}
    assert writer.encoded(task_id, other, states.STARTED) == writer.encoded_by_celery(
        task_id, other, states.STARTED
    )


def test_a_failure_is_read_back_as_the_dispatchkit_error(
    app: celery.Celery, ledger: Ledger, url: str
) -> None:
    ours = str(uuid.uuid4())
    error = DispatchTimeout("no answer within 2s")
    write(ledger, writer_of(app, url), ours, CarriedError(_json(error.to_dict())), "FAILURE")
    result = CeleryResult(app.AsyncResult(ours), 5.0)
    assert result.state == states.FAILURE
    with pytest.raises(DispatchTimeout, match="no answer within 2s"):
        result.get()


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def test_result_failure_expires_applies_to_failures_as_in_celery(url: str) -> None:
    app = make_app(url)
    app.conf.result_failure_expires = 77
    try:
        with ledger_on(url) as ledger:
            ours, celerys = new_ids()
            failure = CarriedError('{"type": "DispatchError", "message": "no"}')
            write(ledger, writer_of(app, url), ours, failure, states.FAILURE)
            celery_store(app, celerys, failure, states.FAILURE)
            _, ttl = raw_meta(ledger.client, app, ours)
            _, their_ttl = raw_meta(ledger.client, app, celerys)
    finally:
        app.close()
    assert abs(ttl - their_ttl) <= 2
    assert 70 <= ttl <= 77


@pytest.mark.parametrize("later", [states.STARTED, "RETRY", states.FAILURE])
def test_a_success_is_never_overwritten_as_in_celery(
    app: celery.Celery, ledger: Ledger, url: str, later: str
) -> None:
    ours, celerys = new_ids()
    writer = writer_of(app, url)
    write(ledger, writer, ours, 100, states.SUCCESS)
    celery_store(app, celerys, 100, states.SUCCESS)
    value: Any = {"pid": 1} if later == states.STARTED else Waiting(1.0, 2)
    if later == states.FAILURE:
        value = CarriedError("{}")
    write(ledger, writer, ours, value, later)
    celery_store(app, celerys, value, later)
    assert seen(app, ours) == seen(app, celerys)
    assert app.AsyncResult(ours).state == "SUCCESS"


def test_a_waiting_get_wakes_on_the_publish(app: celery.Celery, ledger: Ledger, url: str) -> None:
    """Celery's Redis backend waits for a result on a pub/sub channel: the write publishes."""
    ours = str(uuid.uuid4())
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(app.AsyncResult(ours).get(timeout=20)))
    waiter.start()
    time.sleep(0.3)  # subscribed by now, in all likelihood; a late subscriber reads the key
    write(ledger, writer_of(app, url), ours, {"retval": 7}, states.SUCCESS)
    waiter.join(25)
    assert got == [{"retval": 7}]


ODD_VALUES: list[tuple[str, Any]] = [
    *VALUES,
    (states.SUCCESS, 'a "quoted" \u00e9 \\ dispatchkit-slot-result'),  # escapes; a slot's name
    (states.SUCCESS, {"dispatchkit-slot-id": ["dispatchkit-slot-date"], "n": -1.5e300}),
    (states.SUCCESS, [True, False, 2**70, "", {}]),
    (states.FAILURE, CarriedError('{"type": "DispatchTimeout", "message": "\\"late\\""}')),
    ("RETRY", Waiting(1.5, 2)),
    # Types JSON lacks, which kombu's encoder writes (tagged, or as text).
    (states.SUCCESS, [datetime.datetime(2026, 11, 29, 8, 0, tzinfo=datetime.timezone.utc)]),
    (states.SUCCESS, {"id": uuid.UUID(int=7), "amount": decimal.Decimal("1.10")}),
    (states.SUCCESS, float("inf")),
]


@pytest.mark.parametrize("task_id", ["t-1", uuid.uuid4().hex, 'odd "id" \u00e9', "a:b.c/d"])
@pytest.mark.parametrize(("state", "value"), ODD_VALUES)
def test_each_state_is_encoded_once_then_filled_to_celerys_bytes(
    app: celery.Celery, url: str, task_id: str, state: str, value: Any
) -> None:
    """The meta around a value is encoded once per state and process; each call's
    value, date and id fill it. The bytes are those of Celery's own meta and encoding."""
    writer = writer_of(app, url)
    date = "2026-11-29T08:00:00.123456+00:00" if state in states.READY_STATES else None
    for _ in range(2):  # the first call makes the state's template, the second fills it
        mine = writer.encoded(task_id, value, state, date)
        assert mine == writer.encoded_by_celery(task_id, value, state, date)
    assert app.backend.decode(mine.payload)["task_id"] == task_id


def test_a_ready_state_is_dated_by_the_clock_in_the_apps_timezone(
    app: celery.Celery, url: str
) -> None:
    before = app.now()
    stored = writer_of(app, url).encoded(str(uuid.uuid4()), 100, states.SUCCESS)
    done = app.backend.decode(stored.payload)["date_done"]
    assert done.endswith(before.isoformat()[-6:])  # the same UTC offset as app.now()
    assert before.isoformat() <= done <= app.now().isoformat()


STORED_BY_CELERY: list[tuple[str, Any]] = [
    (states.SUCCESS, {"__type__": "datetime", "__value__": "2026-11-29T08:00:00"}),
    (states.SUCCESS, datetime.datetime(2026, 11, 29, 8, 0, tzinfo=datetime.timezone.utc)),
    (states.SUCCESS, float("nan")),  # JSON that orjson refuses
    (states.SUCCESS, 2**80),
    (states.SUCCESS, "\ud800"),  # a lone surrogate
    (states.SUCCESS, {"k": [1.1, -0.0, 1e-310]}),
    (states.FAILURE, CarriedError('{"type": "HTTPStatusError", "message": "503"}')),
    ("REVOKED", None),
]


@pytest.mark.parametrize(("state", "value"), [*ODD_VALUES, *STORED_BY_CELERY])
@pytest.mark.parametrize("writer", ["dispatchkit", "celery"])
def test_a_result_reads_as_celerys_get_task_meta_reads_it(
    app: celery.Celery, ledger: Ledger, url: str, writer: str, state: str, value: Any
) -> None:
    """``read_meta`` (a success parsed with orjson) is ``get_task_meta``, whoever stored it."""
    task_id = str(uuid.uuid4())
    if writer == "dispatchkit":
        write(ledger, writer_of(app, url), task_id, value, state)
    else:
        celery_store(app, task_id, value, state)
    mine, celerys = read_meta(app.backend, task_id), app.backend.get_task_meta(task_id)
    if isinstance(celerys["result"], BaseException):  # rebuilt anew by each read
        assert (type(mine["result"]), mine["result"].args) == (
            type(celerys["result"]),
            celerys["result"].args,
        )
        mine["result"] = celerys["result"]
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(mine.pop("result"))
        assert math.isnan(celerys.pop("result"))
    assert mine == celerys
    assert read_meta(app.backend, str(uuid.uuid4())) == app.backend.get_task_meta("nobody")


def _counting_mgets(app: celery.Celery, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each MGET the backend's client sends from now on."""
    client = app.backend.client
    sizes: list[int] = []
    mget = client.mget

    def counted(keys: list[Any], *args: Any) -> Any:
        sizes.append(len(keys))
        return mget(keys, *args)

    monkeypatch.setattr(client, "mget", counted)
    return sizes


def test_a_batch_is_read_ahead_in_bulk_as_get_task_meta_reads_each(
    app: celery.Celery, ledger: Ledger, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 of 100 results done (one a failure): each reads as ``get_task_meta`` reads it,
    the successes read ahead in a few MGETs; the rest read as not done, then as done
    once they are."""
    writer = writer_of(app, url)
    ids = [str(uuid.uuid4()) for _ in range(100)]
    for n, task_id in enumerate(ids[:60]):
        state, value = (states.FAILURE, CarriedError("{}")) if n == 30 else (states.SUCCESS, n)
        write(ledger, writer, task_id, value, state)
    batch = ReadAhead(app.backend, ids)
    sizes = _counting_mgets(app, monkeypatch)
    for task_id in ids[:60]:
        mine, celerys = batch.meta(task_id), app.backend.get_task_meta(task_id)
        assert mine is not None
        if celerys["status"] == states.FAILURE:
            assert type(mine["result"]) is type(celerys["result"]) is CarriedError
            mine["result"] = celerys["result"]
        assert mine == celerys
    assert len(sizes) <= 6  # 16, 32, 64 at a time: not one read per result
    assert sum(sizes) < 200
    waiting = batch.meta(ids[60])
    assert waiting == {"status": states.PENDING, "result": None}
    write(ledger, writer, ids[60], "late", states.SUCCESS)
    assert batch.meta(ids[60]) == app.backend.get_task_meta(ids[60])  # read again, done now
    assert batch.meta(str(uuid.uuid4())) is None  # not of this batch: read alone


def test_take_stores_started_only_when_the_message_runs_the_attempt(
    app: celery.Celery, ledger: Ledger, url: str
) -> None:
    task_id = str(uuid.uuid4())
    writer = writer_of(app, url)
    ledger.enqueue(task_id, {"url": "http://127.0.0.1:9/"}, {"attempts": 3}, "q", 60)
    started = writer.encoded(task_id, {"pid": 1, "hostname": "a"}, states.STARTED)
    assert ledger.take_attempt(task_id, 1, "first", started) == 0
    assert app.AsyncResult(task_id).state == states.STARTED
    celery_store(app, task_id, Waiting(time.time() + 60, 2), "RETRY")  # as a wait would show it
    copy = writer.encoded(task_id, {"pid": 9, "hostname": "b"}, states.STARTED)
    assert ledger.take_attempt(task_id, 1, "second", copy) is None  # a duplicate
    assert app.AsyncResult(task_id).state == "RETRY"  # untouched by the duplicate


def test_finish_stores_the_result_before_marking_the_call_done(
    app: celery.Celery, ledger: Ledger, url: str
) -> None:
    task_id = str(uuid.uuid4())
    ledger.enqueue(task_id, {"url": "http://127.0.0.1:9/"}, {"attempts": 3}, "q", 60)
    assert ledger.take_attempt(task_id, 1, "t") == 0
    stored = writer_of(app, url).encoded(task_id, 100, states.SUCCESS)
    ledger.batch.run(lambda pipe: ledger.add_finish(pipe, task_id, 1, 60, 0, stored))
    assert app.AsyncResult(task_id).get(timeout=5) == 100
    assert ledger.client.hget(ledger.call_key(task_id), "state") == b"done"


def test_a_value_too_large_for_redis_is_celerys_error(app: celery.Celery, url: str) -> None:
    writer = writer_of(app, url)
    backend: Any = writer.backend
    limit = backend._MAX_STR_VALUE_SIZE
    backend._MAX_STR_VALUE_SIZE = 64
    try:
        with pytest.raises(BackendStoreError):
            writer.encoded(str(uuid.uuid4()), "x" * 100, states.SUCCESS)
    finally:
        backend._MAX_STR_VALUE_SIZE = limit


def test_only_celerys_redis_backend_on_the_ledgers_redis_gets_the_writer(url: str) -> None:
    other_db = urlunsplit(urlsplit(url)._replace(path="/3"))
    cases: list[tuple[dict[str, Any], bool]] = [
        ({}, True),
        ({"result_compression": "zlib"}, False),
        ({"result_backend": other_db}, False),
        ({"result_backend": "cache+memory://"}, False),
    ]
    for conf, expected in cases:
        app = make_app(url)
        app.conf.update(conf)
        try:
            assert (state_writer(app, url) is not None) is expected, conf
        finally:
            app.close()


# -- the coalescer ----------------------------------------------------------------------


class CountingClient(redis.Redis):
    """Counts the pipelines it sends."""

    sent = 0

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        CountingClient.sent += 1
        return super().pipeline(transaction, shard_hint)


def set_and_get(pipe: Any, key: str, field: str, n: int) -> None:
    pipe.hset(key, field, n)
    pipe.hget(key, field)


def together(target: Any, threads: int) -> None:
    """``target(n)`` for n in range(threads), each on a thread of its own; all joined."""
    workers = [threading.Thread(target=target, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(20)


def test_concurrent_threads_share_round_trips_and_get_their_own_replies(url: str) -> None:
    client = CountingClient.from_url(url)
    coalescer = Coalescer(client)
    key = f"test:coalesce:{uuid.uuid4().hex}"
    threads, barrier = 40, threading.Barrier(40)
    replies: dict[int, list[Any]] = {}

    def one(n: int) -> None:
        barrier.wait(10)
        for round_ in range(5):
            commands = partial(set_and_get, key=key, field=f"{n}:{round_}", n=n)
            replies[n * 10 + round_] = coalescer.run(commands)

    CountingClient.sent = 0
    together(one, threads)
    try:
        assert len(replies) == threads * 5
        for slot, reply in replies.items():
            assert reply == [1, str(slot // 10).encode()]
        assert CountingClient.sent < threads * 5  # shared, or there was never a crowd
    finally:
        client.delete(key)
        client.close()


def test_posted_commands_are_all_carried_with_their_own_replies(url: str) -> None:
    """Threads that post (no wait) and threads that run (wait) at once: every posted turn
    is carried even when no thread waits to be handed the lead, in order per thread,
    each with its own replies or its own error."""
    client = CountingClient.from_url(url)
    coalescer = Coalescer(client)
    key, text_key = f"test:coalesce:p:{uuid.uuid4().hex}", f"test:coalesce:t:{uuid.uuid4()}"
    client.set(text_key, "x")
    threads, rounds, barrier = 30, 8, threading.Barrier(30)
    posted: dict[tuple[int, int], Any] = {}
    waited: dict[tuple[int, int], list[Any]] = {}

    def one(n: int) -> None:
        barrier.wait(10)
        for round_ in range(rounds):
            field = f"{n}:{round_}"
            if n % 3 == 0:  # a third of the threads wait for their replies
                waited[n, round_] = coalescer.run(partial(set_and_get, key=key, field=field, n=n))
            elif n % 3 == 1:
                posted[n, round_] = coalescer.post(partial(set_and_get, key=key, field=field, n=n))
            else:  # and these post commands that fail in Redis
                posted[n, round_] = coalescer.post(lambda pipe: pipe.hset(text_key, "f", 1))

    CountingClient.sent = 0
    together(one, threads)
    try:
        assert len(waited) + len(posted) == threads * rounds
        for (n, _), reply in waited.items():
            assert reply == [1, str(n).encode()]
        for (n, _), turn in posted.items():
            if n % 3 == 1:
                assert coalescer.replies(turn) == [1, str(n).encode()]
            else:
                with pytest.raises(redis.ResponseError):
                    coalescer.replies(turn)
                assert isinstance(coalescer.replies(turn, raise_errors=False)[0], Exception)
        assert client.hlen(key) == (threads // 3) * 2 * rounds  # every one went in, once
        assert CountingClient.sent < threads * rounds
    finally:
        client.delete(key, text_key)
        client.close()


def test_one_threads_error_is_its_own(url: str) -> None:
    client = redis.Redis.from_url(url)
    coalescer = Coalescer(client)
    text_key, hash_key = f"test:coalesce:s:{uuid.uuid4().hex}", f"test:coalesce:h:{uuid.uuid4()}"
    client.set(text_key, "x")
    barrier = threading.Barrier(3)
    outcomes: dict[str, Any] = {}

    def run(name: str, commands: Any) -> None:
        barrier.wait(10)
        try:
            outcomes[name] = coalescer.run(commands)
        except Exception as exc:
            outcomes[name] = exc

    def broken(pipe: Any) -> None:
        raise ValueError("could not build its commands")

    jobs = {
        "wrong type": lambda pipe: pipe.hset(text_key, "f", 1),  # WRONGTYPE in Redis
        "fine": lambda pipe: pipe.hset(hash_key, "f", 1),
        "broken": broken,
    }
    workers = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(20)
    try:
        assert isinstance(outcomes["wrong type"], redis.ResponseError)
        assert outcomes["fine"] == [1]
        assert isinstance(outcomes["broken"], ValueError)
        relaxed = coalescer.run(lambda pipe: pipe.hset(text_key, "f", 1), raise_errors=False)
        assert isinstance(relaxed[0], redis.ResponseError)
    finally:
        client.delete(text_key, hash_key)
        client.close()


def test_a_failed_round_trip_fails_its_threads_and_the_next_one_goes_out(url: str) -> None:
    dead = redis.Redis(host="127.0.0.1", port=_free_port(), socket_connect_timeout=1)
    coalescer = Coalescer(dead)
    with pytest.raises(redis.ConnectionError):
        coalescer.run(lambda pipe: pipe.ping())
    live = redis.Redis.from_url(url)
    coalescer.client = live  # the same coalescer: not stuck after a failed round trip
    try:
        assert coalescer.run(lambda pipe: pipe.ping()) == [True]
    finally:
        live.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_scripts_go_by_sha_and_come_back_after_redis_lost_them(
    app: celery.Celery, ledger: Ledger, url: str
) -> None:
    """After ``SCRIPT FLUSH`` (or a Redis restart) the command that met ``NOSCRIPT`` fails as
    on any Redis error; the coalescer loads its scripts again before its next pipeline."""
    writer = writer_of(app, url)
    first, second = new_ids()
    write(ledger, writer, first, 1, states.SUCCESS)  # the scripts are loaded by now
    ledger.client.script_flush()
    with pytest.raises(redis.exceptions.NoScriptError):
        write(ledger, writer, second, 2, states.SUCCESS)
    write(ledger, writer, second, 2, states.SUCCESS)
    assert (app.AsyncResult(first).get(timeout=5), app.AsyncResult(second).get(timeout=5)) == (1, 2)
