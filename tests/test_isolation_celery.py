"""Endpoint isolation shared by the Celery workers: real Redis, a real prefork worker.

One worker with four pool processes (concurrency 4) shares one guard in Redis
(``dispatchkit_celery._guard.RedisGuard``); receivers on 127.0.0.1 count what
reaches them: the Node peer (healthy), a listening socket that closes every
connection at once (refusing), a server that reads the request and never
answers (hanging), and scripted servers that answer, record when, or say 410.
The assertions are on those counts and on the ledger; the one clock-based
check is the rate limit's, which is the feature itself (requests per
one-second window at the receiver), with a burst's margin. Without Redis these
tests skip with the reason (and fail in CI, where Redis is promised).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import pytest
from dispatchkit_celery._config import WorkerConfig, build_dispatcher
from dispatchkit_celery._guard import (
    EndpointBusy,
    GuardUnavailable,
    RedisGuard,
    deferred_until,
)
from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery._wire import Waiting
from dispatchkit_celery.testing import REDIS_URL, Worker, celery_worker

from dispatchkit import (
    CircuitOpenError,
    Dispatcher,
    EndpointDisabledError,
    HTTPStatusError,
    Settings,
    UsageError,
    states,
)
from dispatchkit._cli import main
from dispatchkit._endpoints import endpoint_key
from dispatchkit.builtin.endpoints import EndpointPolicy, MemoryGuard
from support import celery_env
from support.celery_env import ledger_on, redis_db
from support.probes import free_port
from support.scripted_server import (
    RawRequest,
    ScriptedServer,
    close,
    envelope,
    read,
    response,
    serve,
)

#: A database of its own (the delivery tests use another): emptied before and after.
URL = urlsplit(REDIS_URL)._replace(path="/7").geturl()
QUEUE = f"dispatchkit-isolation-{uuid.uuid4().hex[:8]}"
FAILURES, COOLDOWN, MAX_COOLDOWN = 3, 1.0, 4.0
CONCURRENCY = 4
#: Attempts of at most 2 s under a visibility timeout of 4 s; due calls looked for 10 times a
#: second; a wait for a slot longer than 0.5 s defers the call.
WORKER: dict[str, Any] = {
    "timeout": 1,
    "deadline": 2,
    "visibility_timeout": 4,
    "delivery_poll_interval": 0.1,
    "delivery_claim_lease": 3,
    "endpoint_wait": 0.5,
    "circuit_breaker": {"failures": FAILURES, "cooldown": COOLDOWN, "max_cooldown": MAX_COOLDOWN},
}
#: How long a test waits for what must happen (never an assertion on speed).
PATIENCE = 30.0
RATE = 20


# -- receivers ----------------------------------------------------------------------------


class Recorder:
    """Answers ``/gone`` with 410 and anything else with a success; records every request."""

    def __init__(self) -> None:
        self.server = ScriptedServer([serve(self._answer)], connection_deadline=60,
                                     max_connections=1000)  # fmt: skip

    def __enter__(self) -> Recorder:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(None, None, None)

    @property
    def url(self) -> str:
        return self.server.url

    def times(self, path: str) -> list[float]:
        """When each request to ``path`` arrived (``time.monotonic()``), in order."""
        return [r.received_at for r in list(self.server.requests) if _path(r) == path]

    def count(self, path: str) -> int:
        return len(self.times(path))

    @staticmethod
    def _answer(request: RawRequest) -> bytes:
        if _path(request) == "/gone":
            return response(410, b"gone", content_type="text/plain")
        return response(200, envelope("ok"))


def _path(request: RawRequest) -> str:
    return urlsplit(request.target).path


class Dead:
    """A receiver that fails every attempt, counting each: by refusing or by hanging."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "refusing":  # accepts, then closes at once: the client's attempt fails
            script: Any = [close()]
        else:  # reads the request and never answers: the attempt times out
            script = [read(), lambda conn: conn.wait_for_close()]
        self.server = ScriptedServer(script, connection_deadline=30, max_connections=1000)

    @property
    def url(self) -> str:
        return self.server.url

    def attempts(self) -> int:
        counts = self.server.counts
        if self.kind == "refusing":
            return counts["connections_accepted"] + counts["connections_rejected"]
        return len(self.server.requests)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_db(URL) as url:
        yield url


@pytest.fixture(scope="module")
def rated() -> Iterator[Recorder]:
    """Its origin is limited to 20 calls a second in the worker's settings."""
    with Recorder() as recorder:
        yield recorder


@pytest.fixture(scope="module")
def slow() -> Iterator[Recorder]:
    """Its origin is limited to one call a second: a wait longer than endpoint_wait."""
    with Recorder() as recorder:
        yield recorder


@pytest.fixture(scope="module")
def dead() -> Iterator[dict[str, Dead]]:
    """Module-wide: their calls may still come back (deferred) after their test, and their
    ports must not go to another test's receiver meanwhile."""
    receivers = {kind: Dead(kind) for kind in ("refusing", "hanging")}
    for receiver in receivers.values():
        receiver.server.start()
    yield receivers
    for receiver in receivers.values():
        receiver.server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def worker(
    redis_url: str, rated: Recorder, slow: Recorder, dead: dict[str, Dead]
) -> Iterator[Worker]:
    settings = {**WORKER, "rate_limits": {rated.url: f"{RATE}/s", slow.url: "60/m"}}
    with celery_worker(
        QUEUE, concurrency=CONCURRENCY, url=redis_url, worker_settings=settings
    ) as running:
        yield running


@pytest.fixture
def guard(redis_url: str, dead: dict[str, Dead]) -> Iterator[RedisGuard]:
    """The workers' guard, seen from the test's process; every other origin's state is
    forgotten after the test (ports are handed out again)."""
    opened = RedisGuard(redis_url, policy(), lease=4)
    yield opened
    kept = {endpoint_key(d.url)[0] for d in dead.values()}
    client = opened.client
    for origin in map(str, client.zrange(opened.origins, 0, -1)):
        if origin not in kept:
            client.delete(*opened.keys(origin)[:3])
            client.zrem(opened.origins, origin)
    opened.close()


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Ledger]:
    with ledger_on(redis_url) as opened:
        yield opened


@pytest.fixture
def celery(redis_url: str, make_dispatcher: Any) -> Callable[..., Dispatcher]:
    """Dispatchers on the Celery executor (durable schedule, no jitter unless asked)."""

    def make(**settings: Any) -> Dispatcher:
        settings.setdefault("retry_jitter", 0)
        dispatcher: Dispatcher = make_dispatcher(
            executor="celery", celery_broker=redis_url, celery_queue=QUEUE,
            celery_get_timeout=PATIENCE, **settings,
        )  # fmt: skip
        return dispatcher

    return make


@pytest.fixture
def cli_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"DISPATCHKIT_EXECUTOR": "celery", "DISPATCHKIT_CELERY_BROKER": redis_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DISPATCHKIT_DELIVERY_REDIS", raising=False)
    return env


def policy(**settings: Any) -> EndpointPolicy:
    """The workers' policy (a breaker of 3 failures, 1 s; 410 disables), or another."""
    given = {"circuit_breaker": WORKER["circuit_breaker"], "disable_on_gone": True, **settings}
    return EndpointPolicy.from_settings(Settings.from_kwargs(given))


def eventually(condition: Callable[[], bool], timeout: float = PATIENCE) -> bool:
    return celery_env.eventually(condition, timeout, 0.02)


def state_of(guard: RedisGuard, url: str) -> Any:
    origin = endpoint_key(url)[0]
    return next((s for s in guard.states(time.time()) if s.origin == origin), None)


def call_hash(ledger: Ledger, task_id: str) -> dict[str, str]:
    fields = ledger.client.hgetall(ledger.call_key(task_id))
    return {_text(k): _text(v) for k, v in fields.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- the guard in Redis, without workers --------------------------------------------------------


def test_a_half_open_breaker_lets_one_probe_through_among_processes(redis_url: str) -> None:
    origin, endpoint = "http://probe.test:80", "http://probe.test:80/hook"
    quick = policy(circuit_breaker={"failures": 2, "cooldown": 0.2, "max_cooldown": 0.4})
    guards = [RedisGuard(redis_url, quick, lease=5) for _ in range(3)]  # three "processes"
    try:
        first, second, third = guards
        for _ in range(2):
            assert first.admit(origin, endpoint, 0).verdict == "go"
            first.report(origin, endpoint, "failure", 0)
        refused = second.admit(origin, endpoint, 0)
        assert (refused.verdict, refused.reason) == ("open", "2 failures in a row")
        assert refused.retry_at is not None
        assert refused.retry_at > time.time()
        time.sleep(0.25)
        with ThreadPoolExecutor(12) as pool:  # 12 attempts at once from three processes
            answers = list(pool.map(lambda i: guards[i % 3].admit(origin, endpoint, 0), range(12)))
        probes = [i for i, a in enumerate(answers) if a.verdict == "go"]
        assert len(probes) == 1
        assert answers[probes[0]].probe
        assert {a.reason for a in answers if a.verdict == "open"} == {"its one probe is in flight"}
        guards[probes[0] % 3].report(origin, endpoint, "failure", 0, probe=True)
        shown = state_of(third, "http://probe.test/")
        assert (shown.breaker, shown.failures, shown.cooldown) == ("open", 3, 0.4)  # doubled
        time.sleep(0.45)
        probe = third.admit(origin, endpoint, 0)
        assert probe.probe
        third.report(origin, endpoint, "success", 0, probe=True)
        shown = state_of(first, "http://probe.test/")
        assert (shown.breaker, shown.failures, shown.cooldown) == ("closed", 0, 0.2)
    finally:
        for opened in guards:
            opened.client.delete(*opened.keys(origin)[:3])
            opened.close()


def test_a_killed_holder_gives_its_slot_back_after_the_lease(redis_url: str) -> None:
    origin, endpoint = "http://lease.test:80", "http://lease.test:80/"
    capped = policy(origin_concurrency=1)
    killed = RedisGuard(redis_url, capped, lease=0.5)  # admits, then never reports
    other = RedisGuard(redis_url, capped, lease=0.5)
    try:
        assert killed.admit(origin, endpoint, 0).verdict == "go"
        waiting = other.admit(origin, endpoint, 0)
        assert waiting.verdict == "wait"
        assert "origin_concurrency=1" in waiting.reason
        assert state_of(other, origin).in_flight == 1
        assert eventually(lambda: other.admit(origin, endpoint, 0).verdict == "go", 5)
        other.report(origin, endpoint, "success", 0)
    finally:
        other.client.delete(*other.keys(origin)[:3])
        killed.close()
        other.close()


def test_a_long_wait_for_a_token_is_a_deferral_in_a_worker_only(redis_url: str) -> None:
    from dispatchkit_celery._guard import deferrable

    origin, endpoint = "http://token.test:80", "http://token.test:80/"
    limited = RedisGuard(redis_url, policy(rate_limits={origin: "60/m"}), lease=5)
    try:
        assert limited.admit(origin, endpoint, 0).verdict == "go"  # the burst: one
        limited.report(origin, endpoint, "success", 0)
        plain = limited.admit(origin, endpoint, 0)  # in-process rules: wait for the token
        assert plain.verdict == "wait"
        assert 0.5 < plain.wait <= 1.0
        with deferrable(0.2), pytest.raises(EndpointBusy) as info:
            limited.admit(origin, endpoint, 0)
        assert "rate limit 60/m" in str(info.value)
        now = time.time()
        back = deferred_until(info.value, now)
        assert back is not None
        assert info.value.retry_at + 0.1 <= back - (now - time.time()) <= info.value.retry_at + 1.2
        probing = CircuitOpenError("its one probe is in flight", origin=origin, retry_at=now)
        back = deferred_until(probing, now)
        assert back is not None
        assert now + 1.1 <= back <= now + 5.0 + 1.0 + 0.5  # asks again once the probe is done
        assert deferred_until(HTTPStatusError("x", status=503, headers={}, body=b""), now) \
            is None  # fmt: skip
    finally:
        limited.client.delete(*limited.keys(origin)[:3])
        limited.close()


def test_an_unreachable_guard_refuses_admission_and_never_fails_a_report() -> None:
    port = free_port()
    lost = RedisGuard(f"redis://127.0.0.1:{port}/0", policy(), lease=5)
    try:
        with pytest.raises(GuardUnavailable, match="nothing was sent") as info:
            lost.admit("http://x.test:80", "http://x.test:80/", 0)
        assert info.value.transient
        back = deferred_until(info.value, 0.0)
        assert back is not None
        assert 5.0 < back < 7.0
        lost.report("http://x.test:80", "http://x.test:80/", "failure", 0)  # logged, not raised
        with pytest.raises(GuardUnavailable):
            lost.states(0)
    finally:
        lost.close()


# -- who gets which guard ---------------------------------------------------------------------


def test_workers_and_celery_dispatchers_share_a_guard_with_breaker_and_gone_on(
    redis_url: str,
) -> None:
    worker = build_dispatcher(WorkerConfig.from_settings(redis_url, {}))
    with worker:
        shared = worker._pipeline.guard
        assert isinstance(shared, RedisGuard)
        assert shared.url == redis_url  # the ledger's Redis: the broker here
        assert shared.policy.breaker is not None
        assert shared.policy.disable_on_gone
    off = {"circuit_breaker": False, "disable_on_gone": False}
    with build_dispatcher(WorkerConfig.from_settings(redis_url, off)) as worker:
        assert worker._pipeline.guard is None
    local = {"endpoints_redis": None}  # each worker process keeps its own, in-process
    with build_dispatcher(WorkerConfig.from_settings(redis_url, local)) as worker:
        assert isinstance(worker._pipeline.guard, MemoryGuard)
    with Dispatcher(executor="celery", celery_broker=redis_url) as caller:
        assert isinstance(caller._pipeline.guard, RedisGuard)  # caller.endpoints: the workers'
    with Dispatcher() as threads:  # off stays the default in-process
        assert threads._pipeline.guard is None
    with Dispatcher(endpoints_redis=redis_url, rate_limits={"*": "5/s"}) as opted_in:
        assert isinstance(opted_in._pipeline.guard, RedisGuard)
        assert opted_in._pipeline.guard.policy.breaker is None  # defaults stay off
    with pytest.raises(UsageError, match="endpoints_redis"):
        Dispatcher(endpoints_redis="http://127.0.0.1:6379/7", circuit_breaker=True)


# -- on the workers ---------------------------------------------------------------------------


def test_the_rate_limit_holds_across_four_worker_processes(
    worker: Worker, celery: Callable[..., Dispatcher], rated: Recorder
) -> None:
    d = celery()
    results = [d.submit(f"{rated.url}/ok") for _ in range(80)]
    assert [r.get() for r in results] == ["ok"] * 80  # they waited, none failed
    times = sorted(rated.times("/ok"))
    assert len(times) == 80
    # Any one-second window at the receiver: the burst (20) plus a second's refill (20), and
    # a generous margin for the trip from Redis's clock to the receiver's.
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= RATE + RATE + 5
    assert times[-1] - times[0] >= (80 - RATE) / RATE * 0.9  # 60 beyond the burst, at 20/s


def test_a_long_wait_for_a_token_defers_the_call_without_spending_an_attempt(
    worker: Worker, celery: Callable[..., Dispatcher], slow: Recorder, ledger: Ledger
) -> None:
    d = celery(retry_schedule=[60])  # a spent attempt would wait a minute
    results = [d.submit(f"{slow.url}/ok") for _ in range(3)]
    assert [r.get() for r in results] == ["ok"] * 3
    assert slow.count("/ok") == 3  # each sent once
    times = slow.times("/ok")
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(times))  # 60/m held
    records = [call_hash(ledger, r.id) for r in results]
    assert [record["attempt"] for record in records] == ["1"] * 3
    deferred = [r for r in records if "EndpointBusy" in r.get("error", "")]
    assert deferred, "no call was deferred: each waited in its worker process"


def test_an_open_breaker_defers_the_call_without_spending_an_attempt(
    worker: Worker,
    celery: Callable[..., Dispatcher],
    guard: RedisGuard,
    ledger: Ledger,
) -> None:
    with Recorder() as receiver:
        origin, endpoint = endpoint_key(f"{receiver.url}/hook")
        # Another process saw the receiver fail: its breaker is open for every worker.
        opener = RedisGuard(guard.url, policy(circuit_breaker={"cooldown": 2.0}), lease=4)
        for _ in range(5):
            assert opener.admit(origin, endpoint, 0).verdict == "go"
            opener.report(origin, endpoint, "failure", 0)
        opener.close()
        retry_at = state_of(guard, receiver.url).retry_at
        assert retry_at is not None
        # Without a schedule the call ends at once, as in-process.
        with pytest.raises(CircuitOpenError) as info:
            celery(retry_schedule=None).submit(f"{receiver.url}/hook").get()
        assert info.value.origin == origin
        assert info.value.retry_at == pytest.approx(retry_at)
        # With one, it waits in the ledger until the breaker lets a probe through.
        d = celery(retry_schedule=[60, 60])  # a spent attempt would wait a minute
        result: Any = d.submit(f"{receiver.url}/hook")
        assert eventually(lambda: call_hash(ledger, result.id).get("state") == "waiting")
        waiting = call_hash(ledger, result.id)
        assert waiting["attempt"] == "1"  # the same attempt, still to be made
        assert json.loads(waiting["error"])["type"] == "CircuitOpenError"
        assert retry_at + 0.1 <= float(waiting["due"]) <= retry_at + 1.0 + 0.2 * 2 + 0.1
        assert result.state == states.RETRY
        meta = result.celery_result.backend.get_task_meta(result.id)["result"]
        assert isinstance(meta, Waiting)
        assert meta.attempt == 1
        assert receiver.count("/hook") == 0  # nothing was sent
        assert result.get() == "ok"  # the probe, after the cool-down
        assert receiver.count("/hook") == 1
        assert eventually(lambda: call_hash(ledger, result.id).get("state") == "done")
        assert call_hash(ledger, result.id)["attempt"] == "1"  # ended with its first attempt
        assert state_of(guard, receiver.url).breaker == "closed"


def test_410_disables_the_url_for_every_worker_until_it_is_enabled(
    worker: Worker,
    celery: Callable[..., Dispatcher],
    guard: RedisGuard,
    redis_url: str,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Recorder() as receiver:
        gone = f"{receiver.url}/gone"
        d = celery()
        with pytest.raises(HTTPStatusError) as info:
            d.submit(gone).get()
        assert info.value.status == 410
        # Eight calls at once, spread over the four pool processes: none is sent.
        results = [d.apply_async(gone, kwargs={"n": n}) for n in range(8)]
        for result in results:
            with pytest.raises(EndpointDisabledError) as disabled:
                result.get()
            assert disabled.value.endpoint == gone
        assert d.submit(f"{receiver.url}/ok").get() == "ok"  # the origin's other URLs go
        # And in this process, through the same Redis: refused, nothing sent.
        with (
            Dispatcher(endpoints_redis=redis_url, disable_on_gone=True) as here,
            pytest.raises(EndpointDisabledError),
        ):
            here.call(gone)
        assert receiver.count("/gone") == 1
        assert state_of(guard, gone).disabled == (gone,)

        assert main(["endpoints", "enable", f"{gone}?x=1"]) == 0
        assert capsys.readouterr().out == f"enabled {gone}\n"
        assert main(["endpoints", "enable", gone]) == 1  # not disabled any more
        assert "is not disabled" in capsys.readouterr().err
        with pytest.raises(HTTPStatusError):
            d.submit(gone).get()  # called again, and disabled again
        assert receiver.count("/gone") == 2


def test_endpoints_list_enable_and_reset_on_the_command_line(
    guard: RedisGuard, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    broken, limited = "http://broken.test:8080", "https://limited.test"
    opener = RedisGuard(guard.url, policy(circuit_breaker={"cooldown": 60}), lease=4)
    for _ in range(5):
        opener.admit(broken, f"{broken}/hook", 0)
        opener.report(broken, f"{broken}/hook", "failure", 0)
    opener.close()
    lim = RedisGuard(
        guard.url, policy(rate_limits={limited: "20/s"}, origin_concurrency=4), lease=4
    )
    lim.admit(f"{limited}:443", f"{limited}:443/old", 0)  # one attempt in flight
    guard.report(f"{limited}:443", f"{limited}:443/old", "gone", 0)

    env = {**os.environ, **cli_env, "PYTHONUTF8": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dispatchkit", "endpoints", "list", "--json"],
        capture_output=True, text=True, timeout=PATIENCE, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = {entry["origin"]: entry for entry in json.loads(done.stdout)}
    assert shown[broken]["breaker"] == "open"
    assert shown[broken]["failures"] == 5
    assert 0 < shown[broken]["retry_in"] <= 60
    assert shown[f"{limited}:443"] == shown[f"{limited}:443"] | {
        "breaker": "closed", "rate_limit": "20/s", "concurrency": 4, "in_flight": 1,
        "disabled": [f"{limited}:443/old"], "retry_at": None,
    }  # fmt: skip

    assert main(["endpoints", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ORIGIN", "BREAKER", "FAILURES", "RETRY", "IN", "COOLDOWN",
                                "RATE", "IN", "FLIGHT"]  # fmt: skip
    row = next(line for line in table if line.startswith(broken))
    assert row.split()[1:3] == ["open", "5"]
    assert f"  disabled: {limited}:443/old" in table

    assert main(["endpoints", "reset", f"{broken}/any/path"]) == 0
    assert capsys.readouterr().out == f"reset {broken}\n"
    assert state_of(guard, broken).breaker == "closed"
    assert main(["endpoints", "reset", "http://never.test"]) == 1
    assert "no state is kept for http://never.test:80" in capsys.readouterr().err
    lim.report(f"{limited}:443", f"{limited}:443/old", "success", 0)
    lim.close()


def test_endpoints_without_a_shared_guard_says_where_the_state_is(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISPATCHKIT_EXECUTOR", "threads")
    assert main(["endpoints", "list"]) == 2
    err = capsys.readouterr().err
    assert "in-process" in err
    assert "DISPATCHKIT_EXECUTOR=celery" in err


@pytest.mark.parametrize("kind", ["refusing", "hanging"])
def test_a_dead_receiver_gets_n_failures_and_probes_while_healthy_calls_complete(
    kind: str,
    worker: Worker,
    celery: Callable[..., Dispatcher],
    peer: str,
    dead: dict[str, Dead],
    guard: RedisGuard,
) -> None:
    receiver = dead[kind]
    started = time.monotonic()
    # Retried five times 0.2 s apart: without a breaker the dead receiver would see 72 attempts.
    d = celery(retry_schedule=[0.2] * 5)
    healthy: list[Any] = []
    doomed: list[Any] = []
    for _ in range(12):  # one to one
        healthy.append(d.submit(f"{peer}/record"))
        doomed.append(d.submit(f"{receiver.url}/hook"))
    assert [r.get() for r in healthy] == [r.id for r in healthy]  # every healthy call completes
    assert eventually(lambda: receiver.attempts() >= FAILURES)
    time.sleep(2 * COOLDOWN)  # long enough for probes to come
    seen = receiver.attempts()
    elapsed = time.monotonic() - started
    # Open after FAILURES failures in a row (attempts admitted before it opened, up to one per
    # other pool process, fail too); then at most one probe per cool-down (1 s, then longer).
    probes = 1 + int(elapsed / COOLDOWN)
    assert FAILURES <= seen <= FAILURES + (CONCURRENCY - 1) + probes, (seen, elapsed)
    shown = state_of(guard, receiver.url)
    assert shown.breaker in ("open", "half-open")
    assert shown.failures >= FAILURES
    for result in doomed:  # deferred while the breaker is open, never failed for it
        assert not isinstance(result.result, CircuitOpenError)
