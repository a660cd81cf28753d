"""Every attempt recorded on Celery, dead letters and their replay: real Redis, real workers.

The receiver is the Node peer: ``/flaky?fail=N`` answers 503 to the first N
requests of each Idempotency-Key and then succeeds with how many it saw;
``/seen`` tells how many requests each key made; ``/status/503`` always fails.
A loopback port nobody listens on is an origin that refuses every attempt.
Schedules are fractions of a second. The module uses a Redis database of its
own (9 on the test suite's Redis), so that other test modules that empty
theirs at the same time leave it alone. Without Redis these tests skip with
the reason (and fail in CI, where Redis is promised).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from dispatchkit_celery import attempts, dead_letters
from dispatchkit_celery._app import make_app
from dispatchkit_celery._dead_letters import DeadLetters, bury, dead_key, letter_key
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery.testing import REDIS_URL, Worker, celery_worker

from dispatchkit import (
    Call,
    ConnectError,
    Dispatcher,
    DispatchError,
    HTTPStatusError,
    RemoteExecuteError,
    UsageError,
    states,
)
from dispatchkit._cli import main
from dispatchkit._delivery_cli import parse_when
from support import celery_env
from support.celery_env import ledger_on, redis_db

#: The test suite's Redis, database 9: this module's own.
URL = urlunsplit(urlsplit(REDIS_URL)._replace(path="/9"))
QUEUE = f"dispatchkit-dead-{uuid.uuid4().hex[:8]}"
ATTEMPTS_TTL = 3600
DEAD_LETTER_TTL = 7200
SETTINGS: dict[str, object] = {
    "timeout": 2,
    "deadline": 3,
    "visibility_timeout": 5,
    "delivery_poll_interval": 0.1,
    "delivery_claim_lease": 3,
    "attempts_ttl": ATTEMPTS_TTL,
    "dead_letter_ttl": DEAD_LETTER_TTL,
    # The tests fail one origin on purpose, many times: no breaker may stop its calls.
    "circuit_breaker": False,
}
#: How long a test waits for what must happen (never an assertion on speed).
PATIENCE = 60.0


def eventually(condition: Callable[[], bool], timeout: float = PATIENCE) -> bool:
    return celery_env.eventually(condition, timeout)


def refusing_origin() -> str:
    """A loopback port nobody listens on: every attempt is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``dispatchkit ARGV`` in this process."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_db(URL) as url:
        yield url


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Worker]:
    with celery_worker(QUEUE, concurrency=2, url=redis_url, worker_settings=SETTINGS) as running:
        yield running


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Ledger]:
    with ledger_on(redis_url) as opened:
        yield opened


@pytest.fixture
def db(ledger: Ledger) -> redis.Redis:
    return ledger.client


@pytest.fixture
def durable(worker: Worker, make_dispatcher: Any) -> Callable[..., Dispatcher]:
    """Dispatchers on the Celery executor with a durable schedule, without jitter."""

    def make(**settings: Any) -> Dispatcher:
        settings.setdefault("retry_jitter", 0)
        dispatcher: Dispatcher = make_dispatcher(
            executor="celery", celery_broker=URL, celery_queue=QUEUE,
            celery_get_timeout=PATIENCE, **settings,
        )  # fmt: skip
        return dispatcher

    return make


@pytest.fixture
def seen(peer: str) -> Iterator[Callable[[], dict[str, int]]]:
    """How many requests the peer's /flaky saw per Idempotency-Key."""
    with Dispatcher(timeout=5) as local:
        yield lambda: dict(local.call(f"{peer}/seen"))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment the ``dispatchkit`` command reads its executor from."""
    monkeypatch.setenv("DISPATCHKIT_EXECUTOR", "celery")
    monkeypatch.setenv("DISPATCHKIT_CELERY_BROKER", URL)
    monkeypatch.setenv("DISPATCHKIT_CELERY_QUEUE", QUEUE)
    monkeypatch.delenv("DISPATCHKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)


def die(d: Dispatcher, url: str, **kwargs: Any) -> str:
    """Submit a call that ends as a dead letter; its task id once it is one."""
    result = d.apply_async(url, "GET", kwargs)
    with pytest.raises((HTTPStatusError, ConnectError)):
        result.get()
    assert dead_letters(d).get(result.id) is not None  # kept before the FAILURE is stored
    return result.id


# -- attempts -------------------------------------------------------------------------


def test_every_attempt_is_recorded_and_readable_while_the_call_waits(
    durable: Callable[..., Dispatcher], worker: Worker, ledger: Ledger, db: redis.Redis, peer: str
) -> None:
    d = durable(retry_schedule=[0.1, 60])
    result: Any = d.apply_async(
        f"{peer}/flaky", "GET", {"fail": 2, "token": "query-s3cret"},
        headers={"Authorization": "Bearer header-s3cret"},
    )  # fmt: skip
    waits = lambda: db.hget(ledger.call_key(result.id), "attempt") == b"3"  # noqa: E731
    assert eventually(waits)  # attempt 2 failed: attempt 3 waits 60 s
    assert result.state == states.RETRY
    waiting = result.attempts
    assert [(a.number, a.outcome, a.status) for a in waiting] == [(1, "503", 503), (2, "503", 503)]
    db.zadd(ledger.due, {result.id: time.time()})  # its time has come
    assert result.get() == 3  # the peer's count of requests with this key
    records = result.attempts
    assert records[:2] == waiting
    assert [a.number for a in records] == [1, 2, 3]
    assert [a.outcome for a in records] == ["503", "503", "200"]
    assert records[2].error is None
    assert records[0].error is not None
    assert "503" in records[0].error
    assert all(a.started <= b.started for a, b in itertools.pairwise(records))
    node = worker.name.replace("%h", socket.gethostname())
    pool = set(worker.children())
    for record in records:
        name, _, pid = record.worker.rpartition(":")
        assert name == node
        assert int(pid) in pool
    assert attempts(d, result.id) == records
    # Never a secret: URLs are masked in errors, and no header is recorded.
    stored = repr(db.lrange(ledger.attempts_key(result.id), 0, -1))
    assert "s3cret" not in stored
    assert "token=***" in stored
    assert 0 < db.ttl(ledger.attempts_key(result.id)) <= ATTEMPTS_TTL


def test_the_attempts_command(
    durable: Callable[..., Dispatcher],
    peer: str,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = durable(retry_schedule=[0.1]).submit(f"{peer}/flaky", fail=1)
    assert result.get() == 2

    status, out, err = run(capsys, "attempts", result.id)
    assert (status, err) == (0, "")
    header, first, second = out.splitlines()
    assert header.split()[:5] == ["#", "STARTED", "(UTC)", "DURATION", "OUTCOME"]
    assert first.split()[0] == "1"
    assert " 503 " in first
    assert second.split()[0] == "2"
    assert " 200 " in second
    assert second.endswith(" -")

    status, out, _ = run(capsys, "attempts", result.id, "--json")
    assert status == 0
    assert [(r["number"], r["outcome"]) for r in json.loads(out)] == [(1, "503"), (2, "200")]

    status, out, err = run(capsys, "attempts", "no-such-task")
    assert (status, out) == (1, "")
    assert "no attempt recorded for task no-such-task" in err

    done = subprocess.run(
        [sys.executable, "-m", "dispatchkit", "attempts", result.id, "--json"],
        capture_output=True, text=True, timeout=PATIENCE, env=dict(os.environ), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["outcome"] for r in json.loads(done.stdout)] == ["503", "200"]

    monkeypatch.setenv("DISPATCHKIT_EXECUTOR", "threads")  # an executor that keeps none
    for argv in (["attempts", result.id], ["dead-letters", "list"]):
        status, out, err = run(capsys, *argv)
        assert (status, out) == (2, "")
        assert "keeps no" in err


@pytest.mark.parametrize("record", [b"{not json", b"\xff\xfe", b"[]", b'{"number": "one"}'])
def test_an_unreadable_attempt_record_is_a_clear_error(
    ledger: Ledger,
    make_dispatcher: Any,
    env: None,
    capsys: pytest.CaptureFixture[str],
    record: bytes,
) -> None:
    task_id = uuid.uuid4().hex
    ledger.client.rpush(ledger.attempts_key(task_id), record)
    d = make_dispatcher(executor="celery", celery_broker=URL, celery_queue=QUEUE)
    try:
        with pytest.raises(DispatchError, match=f"task {task_id} has an unreadable attempt"):
            attempts(d, task_id)
        status, out, err = run(capsys, "attempts", task_id)  # no traceback
        assert (status, out) == (1, "")
        assert f"task {task_id} has an unreadable attempt record" in err
    finally:
        ledger.client.delete(ledger.attempts_key(task_id))


# -- dead letters -----------------------------------------------------------------------


def test_an_exhausted_schedule_leaves_a_dead_letter_with_its_attempts(
    durable: Callable[..., Dispatcher], ledger: Ledger, db: redis.Redis, peer: str
) -> None:
    d = durable(retry_schedule=[0.1, 0.1])
    dead = dead_letters(d)
    result = d.apply_async(
        f"{peer}/status/503", "POST", {"order": 42, "api_token": "payload-s3cret"}, json=True,
        headers={"Authorization": "Bearer header-s3cret", "X-Source": "tests"},
    )  # fmt: skip
    with pytest.raises(HTTPStatusError):
        result.get()
    letter = dead.get(result.id)
    assert letter is not None
    assert (letter.call.url, letter.call.method, letter.call.json) == (
        f"{peer}/status/503", "POST", True,
    )  # fmt: skip
    assert letter.call.kwargs == {"order": 42, "api_token": "payload-s3cret"}  # replayable
    assert letter.call.headers == {"X-Source": "tests"}
    assert letter.dropped_headers == ("Authorization",)
    assert letter.origin == peer
    assert isinstance(letter.error, HTTPStatusError)
    assert letter.error.status == 503
    assert [(a.number, a.outcome) for a in letter.attempts] == [(1, "503"), (2, "503"), (3, "503")]
    assert time.time() - 60 < letter.died <= time.time()
    shown = letter.to_dict()
    assert shown["arguments"] == {"order": 42, "api_token": "***"}
    assert "s3cret" not in repr(letter) + json.dumps(shown)
    assert "header-s3cret" not in repr(db.hgetall(letter_key(ledger, result.id)))
    # Kept dead_letter_ttl (the worker's setting), its attempts as long.
    assert ATTEMPTS_TTL < db.ttl(letter_key(ledger, result.id)) <= DEAD_LETTER_TTL
    assert ATTEMPTS_TTL < db.ttl(ledger.attempts_key(result.id)) <= DEAD_LETTER_TTL

    # Answers are final, not dead letters; without a schedule nothing is kept either.
    for url, error in (
        (f"{peer}/fail", RemoteExecuteError),
        (f"{peer}/status/404", HTTPStatusError),
    ):
        final = d.submit(url)
        with pytest.raises(error):
            final.get()
        assert dead.get(final.id) is None
        assert len(final.attempts) == 1  # type: ignore[attr-defined]
    single = durable(retry_schedule=None).submit(f"{peer}/status/503")
    with pytest.raises(HTTPStatusError):
        single.get()
    assert dead.get(single.id) is None
    assert [a.outcome for a in single.attempts] == ["503"]  # type: ignore[attr-defined]


def test_list_filters_by_origin_and_time(
    durable: Callable[..., Dispatcher], env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    d = durable(retry_schedule=[0.1])
    dead = dead_letters(d)
    a, b = refusing_origin(), refusing_origin()
    first = die(d, f"{a}/hook")
    time.sleep(0.01)
    between = time.time()
    second = die(d, f"{b}/hook")
    third = die(d, f"{a}/hook?token=s3cret")
    assert [x.task_id for x in dead.list(origin=a)] == [third, first]  # newest first
    since = {x.task_id for x in dead.list(since=between)}
    assert {second, third} <= since
    assert first not in since
    assert [x.task_id for x in dead.list(origin=f"{a}/other/path", since=between)] == [third]
    assert [x.task_id for x in dead.list(since=datetime.fromtimestamp(between, timezone.utc))]
    assert [x.task_id for x in dead.list(limit=1)] == [third]

    status, out, _ = run(capsys, "dead-letters", "list", "--origin", a, "--json")
    assert status == 0
    listed = json.loads(out)
    assert [x["task_id"] for x in listed] == [third, first]
    assert listed[0]["url"] == f"{a}/hook?token=***"
    iso = datetime.fromtimestamp(between, timezone.utc).isoformat()
    status, out, _ = run(capsys, "dead-letters", "list", "--since", iso)
    assert status == 0
    assert second in out
    assert third in out
    assert first not in out
    assert "ConnectError" in out
    assert "s3cret" not in out
    status, out, _ = run(capsys, "dead-letters", "list", "--since", "1h", "--origin", b)
    assert status == 0
    assert second in out
    assert third not in out

    status, out, _ = run(capsys, "dead-letters", "show", third)
    assert status == 0
    assert f"GET {a}/hook?token=***" in out
    assert "ConnectError" in out
    assert "s3cret" not in out
    assert out.count("ConnectError") >= 3  # the last error and two attempts
    status, out, _ = run(capsys, "dead-letters", "show", third, "--json")
    assert json.loads(out)["attempts"][1]["number"] == 2
    status, _, err = run(capsys, "dead-letters", "show", "no-such-task")
    assert status == 1
    assert "not a dead letter" in err
    status, _, err = run(capsys, "dead-letters", "list", "--since", "yesterday")
    assert status == 2
    assert "--since" in err


# -- replay -----------------------------------------------------------------------------


def test_a_replay_keeps_the_task_id_and_appends_attempts(
    durable: Callable[..., Dispatcher], seen: Callable[[], dict[str, int]], peer: str
) -> None:
    d = durable(retry_schedule=[0.1, 0.1])
    task_id = die(d, f"{peer}/flaky", fail=3)
    assert seen()[task_id] == 3
    [again] = dead_letters(d).replay([task_id])
    assert again is not None
    assert again.id == task_id
    assert again.get() == 4  # the receiver saw the same Idempotency-Key a fourth time
    assert seen()[task_id] == 4
    records = attempts(d, task_id)
    assert [(a.number, a.outcome) for a in records] == [
        (1, "503"), (2, "503"), (3, "503"), (4, "200"),
    ]  # fmt: skip
    assert dead_letters(d).get(task_id) is None
    assert dead_letters(d).replay([task_id]) == [None]  # delivered: nothing to replay


def test_replay_with_a_new_id(
    durable: Callable[..., Dispatcher],
    seen: Callable[[], dict[str, int]],
    peer: str,
    env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = durable(retry_schedule=[0.1, 0.1])
    old = die(d, f"{peer}/flaky", fail=3)
    status, out, err = run(capsys, "dead-letters", "replay", "--new-id", old)
    assert (status, err) == (0, "")
    replayed, was, _, new = out.split()
    assert (replayed, was) == ("replayed", old)
    assert new != old
    dead = dead_letters(d)
    # A fresh key: the peer fails it three times again, so it dies again, under its new id.
    assert eventually(lambda: dead.get(new) is not None)
    letter = dead.get(new)
    assert letter is not None
    assert letter.call.task_id == new
    assert [a.number for a in letter.attempts] == [1, 2, 3]
    assert (seen()[old], seen()[new]) == (3, 3)
    assert dead.get(old) is None
    assert len(attempts(d, old)) == 3  # the old attempts stay with the old id


def test_a_second_replay_is_a_no_op(
    durable: Callable[..., Dispatcher],
    seen: Callable[[], dict[str, int]],
    peer: str,
    env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = durable(retry_schedule=[0.1, 0.1])
    task_id = die(d, f"{peer}/flaky", fail=3)
    dead: DeadLetters = dead_letters(d)
    start = threading.Barrier(8)
    handles: list[Any] = []

    def replay() -> None:
        start.wait(PATIENCE)
        handles.extend(dead.replay([task_id]))

    threads = [threading.Thread(target=replay) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE)
    sent = [h for h in handles if h is not None]
    assert (len(handles), len(sent)) == (8, 1)  # one replay sent it
    status, out, err = run(capsys, "dead-letters", "replay", task_id)  # while it is in flight
    assert (status, out) == (1, "")
    assert f"{task_id} is not a dead letter" in err
    assert "nothing sent" in err
    assert sent[0].get() == 4
    assert seen()[task_id] == 4


def test_replay_all_by_origin(
    durable: Callable[..., Dispatcher], env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    d = durable(retry_schedule=[0.1])
    dead = dead_letters(d)
    a, b = refusing_origin(), refusing_origin()
    at_a = [die(d, f"{a}/hook"), die(d, f"{a}/hook")]
    at_b = die(d, f"{b}/hook")
    before = dead.get(at_b)
    status, out, _ = run(capsys, "dead-letters", "replay", "--all", "--origin", a)
    assert status == 0
    assert out.splitlines() == [f"replayed {task_id}" for task_id in at_a]  # oldest first

    def died_again(task_id: str) -> bool:
        letter = dead.get(task_id)
        return letter is not None and len(letter.attempts) == 4

    # Still refused: each dies again, its new attempts numbered on after the old ones.
    for task_id in at_a:
        assert eventually(lambda task_id=task_id: died_again(task_id))  # type: ignore[misc]
        assert [x.number for x in attempts(d, task_id)] == [1, 2, 3, 4]
    assert dead.get(at_b) == before  # the other origin's is untouched

    [handle] = dead.replay_all(origin=b)
    assert handle.id == at_b
    with pytest.raises(ConnectError):
        handle.get()
    assert eventually(lambda: died_again(at_b))
    status, _, err = run(capsys, "dead-letters", "replay", at_a[0], "--all")
    assert status == 2
    assert "IDs or --all" in err


def test_purge(
    durable: Callable[..., Dispatcher],
    ledger: Ledger,
    db: redis.Redis,
    env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = durable(retry_schedule=[0.1])
    dead = dead_letters(d)
    a, b = refusing_origin(), refusing_origin()
    gone, kept, other = die(d, f"{a}/hook"), die(d, f"{a}/hook"), die(d, f"{b}/hook")
    assert dead.purge([gone, "no-such-task"]) == [gone]
    assert dead.get(gone) is None
    assert not db.exists(letter_key(ledger, gone), ledger.attempts_key(gone))
    assert dead.purge([gone]) == []
    assert dead.replay([gone]) == [None]

    status, out, err = run(capsys, "dead-letters", "purge", "no-such-task")
    assert (status, out) == (1, "purged 0 dead letters\n")
    assert "no-such-task is not a dead letter" in err
    status, out, _ = run(capsys, "dead-letters", "purge", "--all", "--origin", b)
    assert (status, out) == (0, "purged 1 dead letter\n")
    assert dead.get(other) is None
    assert dead.get(kept) is not None
    status, out, _ = run(capsys, "dead-letters", "purge", "--all")
    assert status == 0
    assert dead.list() == []
    assert db.zcard(dead_key(ledger)) == 0
    status, _, err = run(capsys, "dead-letters", "purge")
    assert status == 2
    assert "IDs or --all" in err


# -- the parts ------------------------------------------------------------------------------


def test_a_replay_between_a_death_and_the_end_of_its_call_is_not_undone(redis_url: str) -> None:
    # A namespace of its own, and a queue nobody takes: no worker sees any of this.
    ledger = Ledger(redis_url, f"test:{uuid.uuid4().hex}:")
    app = make_app(redis_url)
    task_id, queue = uuid.uuid4().hex, f"nobody-{uuid.uuid4().hex[:8]}"
    headers = {"X-Api-Key": "k", "X-Source": "s"}
    call = Call("http://127.0.0.1:9/hook", task_id=task_id, headers=headers).to_dict()
    schedule = {"waits": [1], "resend_after": 60}
    try:
        ledger.enqueue(task_id, call, schedule, queue, resend_after=60)
        assert ledger.take_attempt(task_id, 1, "first") == 0
        error = {"type": "ConnectError", "message": "refused"}
        bury(ledger, task_id, call, schedule, queue, 1, error, [], 60, 120)
        assert ledger.client.hget(letter_key(ledger, task_id), "dropped") == b'["X-Api-Key"]'
        handle: Any = lambda sent_as: sent_as  # noqa: E731  # a handle is its id here
        dead = DeadLetters(app, lambda: ledger, handle)
        # The replay comes before the worker marks the dead round done.
        replayed: list[Any] = dead.replay([task_id])
        assert replayed == [task_id]
        assert not ledger.finish(task_id, 1, 60, offset=0)  # the old round: left alone
        assert ledger.client.hget(ledger.call_key(task_id), "state") == b"queued"
        assert ledger.take_attempt(task_id, 1, "second") == 1  # numbered on: attempt 2
        assert ledger.finish(task_id, 1, 60, offset=1)
        assert dead.replay([task_id]) == [None]
        assert ledger.client.llen(queue) == 1  # the replay's one message, in its queue
    finally:
        keys = ledger.client.keys(ledger.prefix + "*")
        if keys:
            ledger.client.delete(*keys)
        ledger.close()
        app.close()


@pytest.mark.parametrize(
    ("use", "message"),
    [
        (lambda dead, d: dead.replay("6f44c159"), "replay takes a list of task ids, not a single"),
        (lambda dead, d: dead.purge("6f44c159"), "purge takes a list of task ids, not a single"),
        (lambda dead, d: dead.purge(None), "purge takes a list of task ids, got NoneType"),
        (lambda dead, d: dead.replay([5]), "a task id is a non-empty str, got 5"),
        (lambda dead, d: dead.get(5), "a task id is a non-empty str, got 5"),
        (lambda dead, d: dead.list(limit=-1), "limit must be a whole number or None, got -1"),
        (lambda dead, d: dead.list(origin=5), "origin must be a URL (str), got 5"),
        (lambda dead, d: dead.purge_all(origin=5), "origin must be a URL (str), got 5"),
        (lambda dead, d: attempts(d, ""), "a task id is a non-empty str, got ''"),
        (
            lambda dead, d: attempts(d, None),  # type: ignore[arg-type]
            "a task id is a non-empty str, got None",
        ),
    ],
)
def test_bad_arguments_are_usage_errors(
    redis_url: str, make_dispatcher: Any, use: Any, message: str
) -> None:
    d = make_dispatcher(executor="celery", celery_broker=redis_url, celery_queue=QUEUE)
    with pytest.raises(UsageError, match=re.escape(message)):
        use(dead_letters(d), d)


@pytest.mark.parametrize(
    "fields",
    [
        {"call": "{not json", "schedule": "{}", "died": "1", "queue": "q", "error": "{}"},
        {"call": "[]", "schedule": "{}", "died": "1", "queue": "q", "error": "{}"},
        {"call": "{}", "schedule": "{}", "error": "{}"},  # no died, no queue
    ],
    ids=["bad-json", "not-a-call", "fields-missing"],
)
def test_an_unreadable_dead_letter_is_a_clear_error(
    ledger: Ledger, redis_url: str, env: None, capsys: pytest.CaptureFixture[str],
    fields: dict[Any, str],
) -> None:  # fmt: skip
    task_id = uuid.uuid4().hex
    ledger.client.hset(letter_key(ledger, task_id), mapping=fields)
    ledger.client.zadd(dead_key(ledger), {task_id: 1.0})
    app = make_app(redis_url)
    try:
        dead = DeadLetters(app, lambda: ledger, lambda sent_as: sent_as)  # type: ignore[arg-type,return-value]
        for read in (lambda: dead.get(task_id), lambda: dead.replay([task_id])):
            with pytest.raises(DispatchError, match=f"dead letter {task_id} is unreadable"):
                read()
        for command in ("show", "replay"):
            status, _, err = run(capsys, "dead-letters", command, task_id)  # no traceback
            assert status == 1
            assert f"dead letter {task_id} is unreadable" in err
        assert dead.purge([task_id]) == [task_id]  # what cannot be read can still go
    finally:
        ledger.client.delete(letter_key(ledger, task_id))
        ledger.client.zrem(dead_key(ledger), task_id)
        app.close()


@pytest.mark.parametrize(
    ("when", "seconds"),
    [
        ("90s", 10_000 - 90),
        ("30m", 10_000 - 1800),
        ("2h", 10_000 - 7200),
        ("1.5d", 10_000 - 129_600),
        ("1w", 10_000 - 604_800),
        ("1970-01-01T02:00:00Z", 7200),
        ("1970-01-01T03:00:00+01:00", 7200),
        ("1970-01-01T02:00", 7200),  # no offset: UTC
        ("1970-01-02", 86_400),
    ],
)
def test_when_is_iso_8601_or_a_time_ago(when: str, seconds: float) -> None:
    assert parse_when(when, now=10_000) == seconds


@pytest.mark.parametrize("when", ["yesterday", "2 h", "-1h", "1y", ""])
def test_a_bad_when_is_refused(when: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_when(when, now=10_000)
