"""Endpoint isolation: circuit breakers, rate limits, in-flight caps and 410 Gone.

Every test that can runs on both drivers (``new_client``, over
``support.drivers``) against real receivers on 127.0.0.1: a scripted server
(:class:`Receiver`) that counts what reaches it, per path, when, and how many
at once. The assertions are on those counts; the one clock-based check is the
rate limit's, which is the feature itself (requests per one-second window at
the receiver), with a burst's margin.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import pickle
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from dispatchkit import (
    Admission,
    AsyncDispatcher,
    Attempt,
    CircuitOpenError,
    ConnectError,
    Dispatcher,
    DispatchError,
    DispatchTimeout,
    EndpointDisabledError,
    EndpointGuard,
    EndpointState,
    HTTPStatusError,
    RemoteExecuteError,
    Request,
    Settings,
    UsageError,
    Verdict,
    hookimpl,
)
from dispatchkit._endpoints import endpoint_key
from dispatchkit.builtin.endpoints import SWEEP_AT, EndpointPolicy, MemoryGuard
from dispatchkit.builtin.retry import is_retryable
from dispatchkit.exceptions import error_from_dict
from support.drivers import DRIVERS, AsyncClient, Client, SyncClient, make_client
from support.probes import Attempts, free_port
from support.scripted_server import RawRequest, ScriptedServer, envelope, response, serve

MakeClient = Callable[..., Client]
WAIT = 5.0  # bound on every wait for a receiver


# -- the receiver ------------------------------------------------------------------------


class Receiver:
    """A task server that counts what reaches it.

    ``/ok``: a success; ``/status/NNN``: that status, no envelope; ``/fail`` and
    ``/fail500``: a failure envelope with 200 or 500; ``/slow?ms=N&status=S``:
    status S (200) after N ms; ``/switch``: the status in :attr:`switch`.
    """

    def __init__(self) -> None:
        self.switch = 503
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # ends every /slow sleep at once
        self.server = ScriptedServer([serve(self._answer)], max_connections=500)

    def __enter__(self) -> Receiver:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self.server.__exit__(None, None, None)

    @property
    def url(self) -> str:
        return self.server.url

    def count(self, path: str) -> int:
        return len(self.times(path))

    def times(self, path: str) -> list[float]:
        """When each request to ``path`` arrived (``time.monotonic()``)."""
        return [r.received_at for r in list(self.server.requests) if _path(r) == path]

    def _answer(self, request: RawRequest) -> bytes:
        path = _path(request)
        args = dict(parse_qsl(urlsplit(request.target).query))
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if path == "/ok":
                return response(200, envelope("ok"))
            if path in ("/fail", "/fail500"):
                failure = json.dumps({"status": "failure", "reason": "no"}).encode()
                return response(500 if path == "/fail500" else 200, failure)
            if path == "/slow":
                self._stopping.wait(int(args.get("ms", "100")) / 1000)
                return self._status(int(args.get("status", "200")))
            if path == "/switch":
                return self._status(self.switch)
            return self._status(int(path.rpartition("/")[2]))
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _status(status: int) -> bytes:
        if status == 200:
            return response(200, envelope("ok"))
        return response(status, b"nope", content_type="text/plain")


def _path(request: RawRequest) -> str:
    return urlsplit(request.target).path


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture(params=DRIVERS)
def new_client(request: pytest.FixtureRequest) -> Iterator[MakeClient]:
    """Clients of one driver (the test runs once per driver), one attempt per call unless
    told otherwise; all closed after the test."""
    made: list[Client] = []

    def make(**settings: Any) -> Client:
        settings.setdefault("timeout", 5)
        settings.setdefault("retry_backoff", 0.01)
        settings.setdefault("retry_attempts", 1)
        client = make_client(request.param, **settings)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# -- helpers ----------------------------------------------------------------------------


def dispatcher_of(c: Client) -> Dispatcher | AsyncDispatcher:
    assert isinstance(c, (SyncClient, AsyncClient))
    return c.dispatcher


def state(c: Client, url: str) -> EndpointState:
    origin = endpoint_key(url)[0]
    (found,) = [s for s in dispatcher_of(c).endpoints.list() if s.origin == origin]
    return found


def outcome(c: Client, url: str, timeout: float | None = None) -> Any:
    """The call's retval, or the DispatchError it raised."""
    try:
        return c.apply(url, timeout=timeout)
    except DispatchError as exc:
        return exc


def concurrently(c: Client, urls: Sequence[str]) -> list[Any]:
    """Call every URL at once (a thread, or a task, each); retvals and errors in order."""
    if isinstance(c, SyncClient):
        with ThreadPoolExecutor(len(urls)) as pool:
            return list(pool.map(lambda url: outcome(c, url), urls))
    assert isinstance(c, AsyncClient)
    d = c.dispatcher

    async def every() -> list[Any]:
        return await asyncio.gather(*(d.apply(url) for url in urls), return_exceptions=True)

    return c.run(every())


def in_background(c: Client, url: str) -> Callable[[], Any]:
    """Start a call of ``url``; return what waits for its retval."""
    if isinstance(c, SyncClient):
        result = c.dispatcher.apply_async(url)
        return lambda: result.get(timeout=WAIT)
    assert isinstance(c, AsyncClient)
    task = c.loop.create_task(c.dispatcher.apply(url))
    return lambda: c.run(task)


def wait_for(c: Client, condition: Callable[[], bool]) -> None:
    """Let time pass (the client's loop running) until ``condition()`` holds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the receiver never saw it"
        c.pause(0.01)


def until_probe(c: Client, url: str) -> None:
    """Let the open breaker's cool-down pass."""
    retry_at = state(c, url).retry_at
    assert retry_at is not None
    c.pause(max(0.0, retry_at - time.time()) + 0.02)


class Seen:
    """The outcome of every attempt, as ``dispatchkit_attempt_done`` records it."""

    name = "seen"

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    @hookimpl
    def dispatchkit_attempt_done(self, request: Request, attempt: Attempt) -> None:
        self.outcomes.append(attempt.outcome)


# -- the circuit breaker ----------------------------------------------------------------


def test_the_breaker_opens_after_n_failures_and_nothing_leaves_while_open(
    new_client: MakeClient, receiver: Receiver
) -> None:
    c = new_client(circuit_breaker={"failures": 3, "cooldown": 30})
    url = f"{receiver.url}/status/503"
    first = time.time()
    for _ in range(3):
        with pytest.raises(HTTPStatusError):
            c.call(url)
    opened = time.time()
    for _ in range(5):
        with pytest.raises(CircuitOpenError) as info:
            c.call(url)
    with pytest.raises(CircuitOpenError):
        c.call(f"{receiver.url}/ok")  # the whole origin, not the one URL
    assert receiver.count("/status/503") == 3
    assert receiver.count("/ok") == 0
    error = info.value
    assert error.origin == f"http://127.0.0.1:{receiver.server.port}"
    assert first + 30 <= error.retry_at <= opened + 30
    assert 0 < error.retry_in <= 30
    assert not error.transient
    assert not is_retryable(error)
    assert "circuit breaker open" in str(error)
    assert "3 failures in a row" in str(error)
    shown = state(c, url)
    assert (shown.breaker, shown.failures, shown.cooldown) == ("open", 3, 30)
    assert shown.retry_at == error.retry_at


def test_retries_stop_at_an_open_breaker(new_client: MakeClient, receiver: Receiver) -> None:
    seen = Seen()
    c = new_client(circuit_breaker={"failures": 2}, retry_attempts=5, plugins=[seen])
    with pytest.raises(CircuitOpenError):
        c.call(f"{receiver.url}/status/503")  # a GET: 503 is retried, until the breaker opens
    assert receiver.count("/status/503") == 2
    assert seen.outcomes == ["503", "503", "CircuitOpenError"]


def test_a_half_open_breaker_lets_exactly_one_probe_through(
    new_client: MakeClient, receiver: Receiver
) -> None:
    c = new_client(circuit_breaker={"failures": 1, "cooldown": 0.2}, pool_maxsize=8)
    with pytest.raises(HTTPStatusError):
        c.call(f"{receiver.url}/status/503")
    until_probe(c, receiver.url)
    assert state(c, receiver.url).breaker == "half-open"
    results = concurrently(c, [f"{receiver.url}/slow?ms=500&status=503"] * 6)
    assert receiver.count("/slow") == 1  # the probe; the others failed fast meanwhile
    assert sum(isinstance(r, HTTPStatusError) for r in results) == 1
    assert sum(isinstance(r, CircuitOpenError) for r in results) == 5
    shown = state(c, receiver.url)
    assert (shown.breaker, shown.failures, shown.cooldown, shown.in_flight) == ("open", 2, 0.4, 0)


def test_the_cooldown_doubles_while_probes_fail_up_to_its_max(
    new_client: MakeClient, receiver: Receiver
) -> None:
    c = new_client(circuit_breaker={"failures": 1, "cooldown": 0.1, "max_cooldown": 0.3})
    url = f"{receiver.url}/status/503"
    cooldowns: list[float | None] = []
    retry_ats: list[float] = []
    for _ in range(4):
        if cooldowns:
            with pytest.raises(CircuitOpenError):
                c.call(url)  # still cooling down: fails fast
            until_probe(c, url)
        with pytest.raises(HTTPStatusError):
            c.call(url)
        shown = state(c, url)
        assert shown.retry_at is not None
        cooldowns.append(shown.cooldown)
        retry_ats.append(shown.retry_at)
    assert cooldowns == [0.1, 0.2, 0.3, 0.3]
    assert all(later >= earlier + 0.2 for earlier, later in itertools.pairwise(retry_ats))
    assert receiver.count("/status/503") == 4


def test_a_successful_probe_closes_the_breaker(new_client: MakeClient, receiver: Receiver) -> None:
    c = new_client(circuit_breaker={"failures": 2, "cooldown": 0.2})
    url = f"{receiver.url}/switch"
    for _ in range(2):
        with pytest.raises(HTTPStatusError):
            c.call(url)
    with pytest.raises(CircuitOpenError):
        c.call(url)
    receiver.switch = 200
    until_probe(c, url)
    assert c.call(url) == "ok"  # the probe
    shown = state(c, url)
    assert (shown.breaker, shown.failures, shown.retry_at, shown.cooldown) == (
        "closed",
        0,
        None,
        0.2,
    )
    assert [c.call(url) for _ in range(5)] == ["ok"] * 5
    assert receiver.count("/switch") == 2 + 1 + 5


def test_answers_from_a_live_receiver_keep_it_closed(
    new_client: MakeClient, receiver: Receiver
) -> None:
    c = new_client(circuit_breaker={"failures": 2, "cooldown": 30})
    base = receiver.url
    for path, error in [
        ("/fail", RemoteExecuteError),  # the task said failure: the receiver is fine
        ("/fail500", RemoteExecuteError),  # a task that raised
        ("/status/404", HTTPStatusError),
        ("/status/410", HTTPStatusError),  # disable_on_gone is off
    ]:
        for _ in range(3):
            with pytest.raises(error):
                c.call(base + path)
        assert receiver.count(path) == 3
    for path in ["/status/503", "/ok", "/status/502", "/ok", "/status/429", "/ok"]:
        outcome(c, base + path)  # failures, but never two in a row
    shown = state(c, base)
    assert (shown.breaker, shown.failures) == ("closed", 0)
    assert receiver.count("/ok") == 3


def test_connection_refused_opens_the_breaker(new_client: MakeClient) -> None:
    attempts, seen = Attempts(), Seen()
    c = new_client(circuit_breaker={"failures": 2}, plugins=[attempts, seen])
    url = f"http://127.0.0.1:{free_port()}/ok"
    for _ in range(2):
        with pytest.raises(ConnectError):
            c.call(url)
    for _ in range(3):
        with pytest.raises(CircuitOpenError):
            c.call(url)
    assert len(attempts.seen) == 2  # prepare_request runs only for attempts admitted
    assert seen.outcomes == ["ConnectError"] * 2 + ["CircuitOpenError"] * 3


def test_a_dead_receiver_does_not_hurt_a_healthy_one(new_client: MakeClient) -> None:
    c = new_client(circuit_breaker={"failures": 3, "cooldown": 0.1, "max_cooldown": 0.1})
    with Receiver() as dead, Receiver() as healthy:
        started = time.monotonic()
        dead_results, healthy_results = [], []
        for _ in range(40):
            dead_results.append(outcome(c, f"{dead.url}/status/503"))
            healthy_results.append(outcome(c, f"{healthy.url}/ok"))
            c.pause(0.005)
        elapsed = time.monotonic() - started
        assert healthy_results == ["ok"] * 40
        assert healthy.count("/ok") == 40
        # While open, only one probe per cool-down reaches the dead receiver.
        probes = dead.count("/status/503") - 3
        assert 0 <= probes <= elapsed / 0.1 + 1
        assert state(c, dead.url).failures == dead.count("/status/503")
        assert sum(isinstance(r, CircuitOpenError) for r in dead_results) == 40 - 3 - probes


# -- rate limits and the in-flight cap ---------------------------------------------------


def test_the_rate_limit_holds_at_the_receiver(new_client: MakeClient, receiver: Receiver) -> None:
    c = new_client(rate_limits={receiver.url: "20/s", "*": "1000/s"}, pool_maxsize=8)
    results = concurrently(c, [f"{receiver.url}/ok"] * 60)
    assert results == ["ok"] * 60  # they waited, none failed
    times = sorted(receiver.times("/ok"))
    # Any one-second window: the bucket's burst (20) plus a second's refill (20), and a
    # little slack for the trip from the client's clock to the receiver's.
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 20 + 20 + 2
    assert times[-1] - times[0] >= (60 - 20) / 20 * 0.9  # 40 beyond the burst, at 20/s


def test_star_covers_every_other_origin_and_a_long_wait_fails_at_once(
    new_client: MakeClient,
) -> None:
    with Receiver() as named, Receiver() as other:
        key = f"HTTP://127.0.0.1:{named.server.port}/"
        c = new_client(rate_limits={key: "7/m", "*": "3/h"})
        assert c.call(f"{named.url}/ok") == c.call(f"{other.url}/ok") == "ok"
        assert state(c, named.url).rate_limit == "7/m"
        assert state(c, other.url).rate_limit == "3/h"
        with pytest.raises(DispatchTimeout) as info:
            c.apply(f"{other.url}/ok", timeout=0.5)  # the next token is 20 minutes away
        assert "rate limit 3/h" in str(info.value)
        assert "nothing was sent" in str(info.value)
        assert other.count("/ok") == 1


def test_the_in_flight_cap_holds_at_the_receiver(
    new_client: MakeClient, receiver: Receiver
) -> None:
    c = new_client(origin_concurrency=3, pool_maxsize=16)
    results = concurrently(c, [f"{receiver.url}/slow?ms=150"] * 12)
    assert results == ["ok"] * 12
    assert receiver.max_in_flight <= 3
    assert receiver.count("/slow") == 12
    shown = state(c, receiver.url)
    assert (shown.concurrency, shown.in_flight) == (3, 0)


def test_waiting_for_a_slot_past_the_timeout_fails(
    new_client: MakeClient, receiver: Receiver
) -> None:
    c = new_client(origin_concurrency=1)
    join = in_background(c, f"{receiver.url}/slow?ms=1000")
    wait_for(c, lambda: receiver.count("/slow") == 1)
    with pytest.raises(DispatchTimeout) as info:
        c.apply(f"{receiver.url}/ok", timeout=0.3)
    assert "origin_concurrency=1" in str(info.value)
    assert receiver.count("/ok") == 0
    assert join() == "ok"
    assert c.call(f"{receiver.url}/ok") == "ok"


def test_a_failing_plugin_gives_its_slot_back(new_client: MakeClient, receiver: Receiver) -> None:
    class BreaksOnce:
        name = "breaks-once"
        broke = False

        @hookimpl
        def dispatchkit_prepare_request(self, request: Request) -> None:
            if not self.broke:
                self.broke = True
                raise RuntimeError("oops")

    c = new_client(origin_concurrency=1, circuit_breaker=True, plugins=[BreaksOnce()])
    with pytest.raises(DispatchError, match="plugin failure"):
        c.call(f"{receiver.url}/ok")
    shown = state(c, receiver.url)
    assert (shown.in_flight, shown.failures) == (0, 0)  # not the receiver's fault
    assert c.apply(f"{receiver.url}/ok", timeout=0.5) == "ok"


def test_cancelling_an_async_call_gives_its_slot_back(receiver: Receiver) -> None:
    async def main() -> None:
        async with AsyncDispatcher(origin_concurrency=1, timeout=5) as d:
            holder = asyncio.ensure_future(d.call(f"{receiver.url}/slow?ms=5000"))
            while receiver.count("/slow") < 1:
                await asyncio.sleep(0.01)
            waiter = asyncio.ensure_future(d.call(f"{receiver.url}/ok"))  # waits for the slot
            await asyncio.sleep(0.1)
            assert not waiter.done()
            assert d.endpoints.list()[0].in_flight == 1
            waiter.cancel()
            holder.cancel()
            for task in (waiter, holder):
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert d.endpoints.list()[0].in_flight == 0
            assert await d.apply(f"{receiver.url}/ok", timeout=0.5) == "ok"
            assert receiver.count("/ok") == 1

    asyncio.run(main())


def test_the_async_driver_waits_without_blocking_its_loop(receiver: Receiver) -> None:
    async def main() -> int:
        async with AsyncDispatcher(rate_limits={"*": "2/s"}, timeout=5) as d:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.ensure_future(tick())
            calls = [d.call(f"{receiver.url}/ok") for _ in range(4)]  # 2 now, 2 in ~1 s
            assert await asyncio.gather(*calls) == ["ok"] * 4
            ticker.cancel()
            with pytest.raises(asyncio.CancelledError):
                await ticker
            return ticks

    assert asyncio.run(main()) >= 10  # a blocked loop would not have ticked at all


# -- 410 Gone ---------------------------------------------------------------------------


def test_gone_disables_the_url_until_it_is_enabled(
    new_client: MakeClient, receiver: Receiver
) -> None:
    c = new_client(disable_on_gone=True, retry_attempts=3)
    gone = f"{receiver.url}/status/410"
    with pytest.raises(HTTPStatusError):
        c.call(gone, x=1)
    with pytest.raises(EndpointDisabledError) as info:
        c.call(gone, x=2)  # another query, the same URL
    assert receiver.count("/status/410") == 1
    assert info.value.endpoint == gone
    assert not info.value.transient
    assert not is_retryable(info.value)
    assert c.call(f"{receiver.url}/ok") == "ok"  # the rest of the origin is fine
    endpoints = dispatcher_of(c).endpoints
    assert state(c, gone).disabled == (gone,)
    assert endpoints.enable(f"{gone}?anything=1")
    assert not endpoints.enable(gone)  # enabled already
    assert state(c, gone).disabled == ()
    with pytest.raises(HTTPStatusError):
        c.call(gone)
    assert receiver.count("/status/410") == 2
    assert endpoints.reset(receiver.url)
    assert state(c, gone).disabled == ()


# -- settings, the hook, the values ------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"circuit_breaker": "yes"}, "takes True, False or a mapping"),
        ({"circuit_breaker": {"failure": 3}}, "unknown key(s) 'failure'"),
        ({"circuit_breaker": {"failures": 0}}, "'failures' must be >= 1"),
        ({"circuit_breaker": {"cooldown": -1}}, "'cooldown' must be positive"),
        ({"circuit_breaker": {"cooldown": 10, "max_cooldown": 5}}, "shorter than 'cooldown'"),
        ({"rate_limits": "10/s"}, "takes a mapping"),
        ({"rate_limits": {"*": "fast"}}, "must be like '50/s'"),
        ({"rate_limits": {"*": "0/s"}}, "must be like '50/s'"),
        ({"rate_limits": {"*": 5}}, "must be like '50/s'"),
        ({"rate_limits": {"https://x.example/path": "1/s"}}, "takes origins"),
        ({"rate_limits": {"http://x.example": "1/s", "HTTP://x.example:80": "2/s"}}, "twice"),
        ({"origin_concurrency": 0}, "'origin_concurrency' must be >= 1"),
        ({"origin_concurrency": True}, "'origin_concurrency' must be an int"),
        ({"disable_on_gone": "yes"}, "must be True or False"),
    ],
)
def test_bad_settings_are_usage_errors(
    new_client: MakeClient, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        new_client(**settings)


def test_without_settings_there_is_no_guard(new_client: MakeClient) -> None:
    d = dispatcher_of(new_client())
    assert d._pipeline.guard is None
    assert d.endpoints.list() == []
    assert not d.endpoints.enable("http://example.invalid/x")
    assert not d.endpoints.reset("http://example.invalid")


class Blocklist:
    """A guard of its own: refuses URLs under ``/blocked``, counts the reports."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, Verdict]] = []

    def admit(self, origin: str, endpoint: str, now: float) -> Admission:
        if "/blocked" in endpoint:
            return Admission("disabled", reason="it is on the blocklist")
        return Admission("go")

    def report(
        self, origin: str, endpoint: str, verdict: Verdict, now: float, *, probe: bool = False
    ) -> None:
        self.reports.append((endpoint, verdict))

    def states(self, now: float) -> list[EndpointState]:
        return [EndpointState(origin) for origin in sorted({e for e, _ in self.reports})]

    def enable(self, endpoint: str) -> bool:
        return False

    def reset(self, origin: str) -> bool:
        return False


class BlocklistPlugin:
    name = "blocklist"

    def __init__(self) -> None:
        self.guard = Blocklist()

    @hookimpl
    def dispatchkit_endpoint_guard(self, settings: Settings) -> EndpointGuard | None:
        return self.guard


def test_a_plugin_replaces_the_guard(new_client: MakeClient, receiver: Receiver) -> None:
    plugin = BlocklistPlugin()
    c = new_client(plugins=[plugin], circuit_breaker=True)  # answered before the built-in
    assert c.call(f"{receiver.url}/ok") == "ok"
    with pytest.raises(HTTPStatusError):
        c.call(f"{receiver.url}/status/503")
    with pytest.raises(EndpointDisabledError, match="blocklist"):
        c.call(f"{receiver.url}/blocked")
    assert plugin.guard.reports == [
        (f"{receiver.url}/ok", "success"),
        (f"{receiver.url}/status/503", "failure"),
    ]
    assert receiver.count("/blocked") == 0


def test_a_guard_that_is_not_one_is_a_usage_error(new_client: MakeClient) -> None:
    class Wrong:
        name = "wrong"

        @hookimpl
        def dispatchkit_endpoint_guard(self, settings: Settings) -> object:
            return "a guard"

    with pytest.raises(UsageError, match="not an EndpointGuard"):
        new_client(plugins=[Wrong()])


@pytest.mark.parametrize(
    ("url", "origin", "endpoint"),
    [
        ("HTTP://Example.COM/a/b?x=1#f", "http://example.com:80", "http://example.com:80/a/b"),
        ("https://u:secret@api.example.com", "https://api.example.com:443", None),
        ("http://127.0.0.1:8080/t", "http://127.0.0.1:8080", "http://127.0.0.1:8080/t"),
        ("http://[::1]:81/t?q", "http://[::1]:81", "http://[::1]:81/t"),
        ("http://h/p#f?x=1/2", "http://h:80", "http://h:80/p"),  # the "?" is the fragment's
        ("http://H?next=/a/b", "http://h:80", None),  # the "/" is the query's
        ("http://h/a?x=1", "http://h:80", "http://h:80/a"),  # cached for the URL without query
        ("http://h/a?x=2", "http://h:80", "http://h:80/a"),
    ],
)
def test_origins_and_endpoints_are_normalized(url: str, origin: str, endpoint: str | None) -> None:
    assert endpoint_key(url) == (origin, endpoint or origin + "/")


def test_the_new_errors_cross_process_boundaries() -> None:
    errors: list[DispatchError] = [
        CircuitOpenError("open", origin="http://h:80", retry_at=1e9),
        EndpointDisabledError("gone", endpoint="http://h:80/x"),
    ]
    for error in errors:
        for copy in (pickle.loads(pickle.dumps(error)), error_from_dict(error.to_dict())):
            assert type(copy) is type(error)
            assert copy.__dict__ == error.__dict__


def test_idle_origins_are_forgotten_and_the_others_kept() -> None:
    guard = MemoryGuard(EndpointPolicy(concurrency=2, disable_on_gone=True))
    now = time.time()
    guard.admit("http://gone.example:80", "http://gone.example:80/x", now)
    guard.report("http://gone.example:80", "http://gone.example:80/x", "gone", now)
    guard.admit("http://busy.example:80", "http://busy.example:80/x", now)  # never reported
    for n in range(3 * SWEEP_AT):
        origin = f"http://h{n}.example:80"
        assert guard.admit(origin, origin + "/", now).verdict == "go"
        guard.report(origin, origin + "/", "success", now)
    kept = {state.origin: state for state in guard.states(now)}
    assert len(kept) <= SWEEP_AT
    assert kept["http://gone.example:80"].disabled == ("http://gone.example:80/x",)
    assert kept["http://busy.example:80"].in_flight == 1
