"""dispatchkit-otel: the spans, headers and metrics of calls, with OpenTelemetry's real SDK.

Against real servers on loopback: a TaskApp wrapped by ``trace_wsgi`` behind a
small WSGI front that keeps the ``traceparent`` of every request (and answers
503 once per call to ``/unavailable``), and the Node.js peer. OpenTelemetry's
global providers can be set once per process, and a global SDK would make
every Dispatcher of the rest of the suite record: so no test here sets one.
The providers (in-memory span exporter, in-memory metric reader with delta
temporality, emptied before each test) are given to the plugin and the
middleware; the global path, the entry point with ``trace.set_tracer_provider``,
runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from dispatchkit_otel import OtelPlugin, configured
from dispatchkit_otel.server import trace_asgi, trace_wsgi
from opentelemetry import propagate, trace
from opentelemetry.sdk.metrics import Counter as CounterInstrument
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dispatchkit import (
    AsyncDispatcher,
    Attempt,
    Call,
    ConnectError,
    Dispatcher,
    DispatchError,
    RemoteExecuteError,
    Request,
    hookimpl,
)
from dispatchkit.server import TaskApp, TaskServer
from support.probes import free_port

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

pytestmark = pytest.mark.timeout(30)

REQUEST_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
HOOKS = (
    "dispatchkit_attempt_done",
    "dispatchkit_call_done",
    "dispatchkit_close",
    "dispatchkit_endpoint_guard",
    "dispatchkit_prepare_request",
    "dispatchkit_submit_options",
)


# -- the providers -----------------------------------------------------------------------


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self, kind: SpanKind | None = None) -> list[ReadableSpan]:
        """The finished spans, oldest first; only those of ``kind`` if given."""
        return [s for s in self.exporter.get_finished_spans() if kind is None or s.kind == kind]

    def metrics(self) -> dict[str, Metric]:
        """What the plugin recorded since the last look (delta temporality), by name."""
        data = self.reader.get_metrics_data()
        found: dict[str, Metric] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                assert scope.scope.name == "dispatchkit"
                found.update((m.name, m) for m in scope.metrics)
        return found

    def plugin(self) -> OtelPlugin:
        return OtelPlugin(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider)


@pytest.fixture(scope="module")
def providers() -> Iterator[Telemetry]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    delta = AggregationTemporality.DELTA
    reader = InMemoryMetricReader(
        preferred_temporality={CounterInstrument: delta, HistogramInstrument: delta}
    )
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield Telemetry(tracer_provider, meter_provider, exporter, reader)
    tracer_provider.shutdown()
    meter_provider.shutdown()


@pytest.fixture
def otel(providers: Telemetry) -> Telemetry:
    providers.exporter.clear()
    providers.metrics()  # drained
    return providers


@pytest.fixture
def make(otel: Telemetry) -> Iterator[Any]:
    """Build Dispatchers with the test's providers; all are closed after the test."""
    made: list[Dispatcher] = []

    def make_dispatcher(**settings: Any) -> Dispatcher:
        settings.setdefault("timeout", 5)
        settings.setdefault("retry_backoff", 0.01)
        settings.setdefault("plugins", [otel.plugin()])
        d = Dispatcher(**settings)
        made.append(d)
        return d

    yield make_dispatcher
    for d in made:
        d.close()


# -- the server ---------------------------------------------------------------------------


def make_app() -> TaskApp:
    app = TaskApp()

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    @app.task
    def echo(**kwargs: str) -> dict[str, str]:
        return kwargs

    @app.task
    def unavailable() -> str:  # the front answers 503 to each call's first attempt
        return "finally"

    @app.task
    def broken(**kwargs: str) -> None:
        raise ValueError("no luck")

    @app.task
    def current() -> str:
        return span_id(trace.get_current_span())

    @app.task
    async def current_async() -> str:
        return span_id(trace.get_current_span())

    @app.task
    def slow(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @app.task
    def hold(seconds: float) -> float:
        HELD.set()  # the caller holds a pooled connection until this returns
        time.sleep(seconds)
        return seconds

    return app


HELD = threading.Event()


class Front:
    """Keeps each request's path and ``traceparent``; fails ``/unavailable`` once per key."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self.seen: list[tuple[str, str | None]] = []
        self._keys: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        path = environ["PATH_INFO"]
        with self._lock:
            self.seen.append((path, environ.get("HTTP_TRACEPARENT")))
            self._keys[environ.get("HTTP_IDEMPOTENCY_KEY", "")] += 1
            first = self._keys[environ.get("HTTP_IDEMPOTENCY_KEY", "")] == 1
        if path == "/unavailable" and first:
            start_response("503 Service Unavailable", [("Content-Length", "9")])
            return [b"try again"]
        return self.app(environ, start_response)

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    def traceparents(self, path: str) -> list[str | None]:
        with self._lock:
            return [header for seen, header in self.seen if seen == path]


@dataclass
class Server:
    url: str
    port: int
    front: Front


@pytest.fixture(scope="module")
def running(providers: Telemetry) -> Iterator[Server]:
    app = make_app()
    traced = trace_wsgi(
        app,
        tracer_provider=providers.tracer_provider,
        meter_provider=providers.meter_provider,
    )
    front = Front(traced)
    with TaskServer(front) as running:
        yield Server(running.url, running.port, front)
    app.close()


@pytest.fixture
def server(running: Server) -> Server:
    running.front.clear()
    return running


def span_id(span: trace.Span) -> str:
    return format(span.get_span_context().span_id, "016x")


def traceparent(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def id_of(span: ReadableSpan | trace.Span) -> int:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.span_id


def times(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None
    assert span.end_time is not None
    return span.start_time, span.end_time


def points(metric: Metric) -> list[Any]:
    return list(metric.data.data_points)


def attempts_of(call: ReadableSpan, spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind == SpanKind.CLIENT and parent_of(s) == id_of(call)]


# -- the plugin's presence ----------------------------------------------------------------


def test_installed_plugin_is_dormant_without_a_configured_sdk() -> None:
    # Nothing in the suite sets a global provider: every Dispatcher in it pays for nothing.
    assert not configured()
    with Dispatcher() as d:
        (info,) = [p for p in d.plugins if p.name == "otel"]
    assert info.distribution == "dispatchkit-otel"
    assert info.hooks == ()
    assert isinstance(info.plugin, OtelPlugin)
    assert not info.plugin.active


def test_a_given_provider_makes_the_plugin_active(otel: Telemetry) -> None:
    plugin = OtelPlugin(tracer_provider=otel.tracer_provider)
    with Dispatcher(plugins=[plugin]) as d:
        (info,) = [p for p in d.plugins if p.name == "otel"]
    assert info.plugin is plugin  # it replaces the entry point's, by name
    assert plugin.active
    assert info.hooks == HOOKS
    assert info.distribution is None


def test_disable_leaves_it_out() -> None:
    with Dispatcher(disable=["otel"]) as d:
        assert "otel" not in [p.name for p in d.plugins]


# -- spans of calls -----------------------------------------------------------------------


def test_a_call_is_a_span_with_a_client_span_per_attempt(
    otel: Telemetry, make: Any, server: Server
) -> None:
    d = make()
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        assert d.call(f"{server.url}/multiply", x=6, y=7) == 42
    (call,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    (attempt,) = otel.spans(SpanKind.CLIENT)
    (served,) = otel.spans(SpanKind.SERVER)
    assert call.kind == SpanKind.INTERNAL
    assert parent_of(call) == id_of(caller)
    assert parent_of(attempt) == id_of(call)
    assert parent_of(served) == id_of(attempt)
    assert len({s.context.trace_id for s in (call, attempt, served) if s.context}) == 1
    url = f"{server.url}/multiply?x=6&y=7"
    assert attempt.name == "GET"
    assert dict(attempt.attributes or {}) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": server.port,
        "url.full": url,
        "http.response.status_code": 200,
    }
    assert attempt.status.status_code == StatusCode.UNSET
    assert dict(call.attributes or {}) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": server.port,
        "url.full": url,
        "dispatchkit.task_id": (call.attributes or {})["dispatchkit.task_id"],
        "dispatchkit.attempts": 1,
    }
    assert call.status.status_code == StatusCode.UNSET
    # The attempt lies within the call, which lies within the caller.
    (outer,) = [s for s in otel.spans() if s.name == "caller"]
    assert times(outer)[0] <= times(call)[0] <= times(attempt)[0]
    assert times(attempt)[1] <= times(call)[1] <= times(outer)[1]
    # The server got the attempt's own context.
    assert server.front.traceparents("/multiply") == [traceparent(attempt)]


def test_each_attempt_of_a_retried_call_is_a_span_of_its_own(
    otel: Telemetry, make: Any, server: Server
) -> None:
    d = make()
    assert d.call(f"{server.url}/unavailable") == "finally"
    (call,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    first, second = attempts_of(call, otel.spans())
    assert (first.attributes or {})["http.response.status_code"] == 503
    assert (first.attributes or {})["error.type"] == "503"
    assert "http.request.resend_count" not in (first.attributes or {})
    assert first.status.status_code == StatusCode.ERROR
    assert first.status.description is None  # the status says it
    assert (second.attributes or {})["http.request.resend_count"] == 1
    assert (second.attributes or {})["http.response.status_code"] == 200
    assert "error.type" not in (second.attributes or {})
    assert second.status.status_code == StatusCode.UNSET
    assert (call.attributes or {})["dispatchkit.attempts"] == 2
    assert call.status.status_code == StatusCode.UNSET
    # Every attempt carries its own context; the server span hangs under the second.
    assert server.front.traceparents("/unavailable") == [traceparent(first), traceparent(second)]
    (served,) = otel.spans(SpanKind.SERVER)
    assert parent_of(served) == id_of(second)

    found = otel.metrics()
    durations = {
        tuple(sorted(p.attributes.items())): p.count
        for p in points(found["http.client.request.duration"])
    }
    common = {"http.request.method": "GET", "server.address": "127.0.0.1"}
    common["server.port"] = server.port  # type: ignore[assignment]
    assert durations == {
        tuple(sorted({**common, "http.response.status_code": 503, "error.type": "503"}.items())): 1,
        tuple(sorted({**common, "http.response.status_code": 200}.items())): 1,
    }
    (retries,) = points(found["dispatchkit.call.retries"])
    assert (retries.value, dict(retries.attributes)) == (1, common)
    (call_duration,) = points(found["dispatchkit.call.duration"])
    assert dict(call_duration.attributes) == common
    assert call_duration.count == 1


def test_retries_against_the_node_peer(otel: Telemetry, make: Any, peer: str) -> None:
    d = make()
    assert d.call(f"{peer}/flaky", fail=2) == 3
    (call,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    attempts = attempts_of(call, otel.spans())
    assert [(a.attributes or {}).get("http.request.resend_count") for a in attempts] == [
        None,
        1,
        2,
    ]
    assert [(a.attributes or {})["http.response.status_code"] for a in attempts] == [503, 503, 200]
    assert [a.status.status_code for a in attempts] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]


def test_connection_refused(otel: Telemetry, make: Any) -> None:
    d = make(retry_attempts=2)
    url = f"http://127.0.0.1:{free_port()}/multiply"
    with pytest.raises(ConnectError):
        d.call(url, x=1, y=2)
    (call,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    attempts = attempts_of(call, otel.spans())
    assert len(attempts) == 2
    for attempt in attempts:
        attributes = attempt.attributes or {}
        assert attributes["error.type"] == "ConnectError"
        assert "http.response.status_code" not in attributes
        assert attempt.status.status_code == StatusCode.ERROR
        assert "127.0.0.1" in (attempt.status.description or "")  # what happened, masked
    assert (call.attributes or {})["error.type"] == "ConnectError"
    assert call.status.status_code == StatusCode.ERROR
    found = otel.metrics()
    (duration,) = points(found["http.client.request.duration"])
    assert duration.count == 2
    assert duration.attributes["error.type"] == "ConnectError"
    assert "http.response.status_code" not in duration.attributes
    (call_duration,) = points(found["dispatchkit.call.duration"])
    assert call_duration.attributes["error.type"] == "ConnectError"


def test_a_failing_task(otel: Telemetry, make: Any, server: Server) -> None:
    d = make()
    with pytest.raises(RemoteExecuteError):
        d.call(f"{server.url}/broken")
    (call,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    (attempt,) = attempts_of(call, otel.spans())
    assert (attempt.attributes or {})["http.response.status_code"] == 500
    assert (attempt.attributes or {})["error.type"] == "500"
    assert (call.attributes or {})["error.type"] == "RemoteExecuteError"
    assert call.status.status_code == StatusCode.ERROR
    assert "no luck" in (call.status.description or "")
    (served,) = otel.spans(SpanKind.SERVER)
    assert (served.attributes or {})["error.type"] == "500"
    assert served.status.status_code == StatusCode.ERROR


class Refuse:
    """Fails every attempt before anything is sent, ahead of the otel plugin."""

    name = "refuse"

    @hookimpl(tryfirst=True)
    def dispatchkit_prepare_request(self, request: Request) -> None:
        raise DispatchError("refused here")


def test_an_attempt_that_sent_nothing_is_an_event(otel: Telemetry, make: Any) -> None:
    d = make(plugins=[otel.plugin(), Refuse()])
    with pytest.raises(DispatchError, match="refused here"):
        d.call(f"http://127.0.0.1:{free_port()}/multiply")
    (call,) = otel.spans()
    assert call.name == "dispatchkit.call"
    (event,) = call.events
    assert event.name == "dispatchkit.attempt.refused"
    assert dict(event.attributes or {}) == {"dispatchkit.attempt": 1, "error.type": "DispatchError"}
    found = otel.metrics()
    assert "http.client.request.duration" not in found
    (refused,) = points(found["dispatchkit.attempt.refused"])
    assert refused.value == 1
    assert refused.attributes["error.type"] == "DispatchError"


def test_url_full_has_no_credentials_and_no_secrets(
    otel: Telemetry, make: Any, server: Server
) -> None:
    d = make()
    base = server.url.replace("http://", "http://alice:s3cret@")
    d.call(f"{base}/echo?api_token=t0ken&sig=abc&plain=1", x="1")
    (attempt,) = otel.spans(SpanKind.CLIENT)
    assert (attempt.attributes or {})["url.full"] == (
        f"http://REDACTED:REDACTED@127.0.0.1:{server.port}/echo"
        "?api_token=REDACTED&sig=REDACTED&plain=1&x=1"
    )
    (served,) = otel.spans(SpanKind.SERVER)
    assert (served.attributes or {})["url.query"] == "api_token=REDACTED&sig=REDACTED&plain=1&x=1"
    for span in otel.spans():
        for value in (span.attributes or {}).values():
            assert not any(secret in str(value) for secret in ("alice", "s3cret", "t0ken", "abc"))


def test_a_traceparent_given_with_the_call_is_its_parent_and_is_replaced(
    otel: Telemetry, make: Any, server: Server
) -> None:
    d = make()
    given = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    # No span is current: the context the call's headers carry is its parent (the way a
    # caller hands its context to a call that runs elsewhere, an executor's thread).
    d.apply(f"{server.url}/multiply", kwargs={"x": 1, "y": 1}, headers={"TraceParent": given})
    (call,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    (attempt,) = otel.spans(SpanKind.CLIENT)
    assert call.parent is not None
    assert (call.parent.trace_id, call.parent.span_id) == (int("1" * 32, 16), int("2" * 16, 16))
    assert call.parent.is_remote
    # Sent once, with the attempt's own context.
    assert server.front.traceparents("/multiply") == [traceparent(attempt)]
    assert traceparent(attempt).startswith("00-" + "1" * 32)

    otel.exporter.clear()
    with otel.tracer_provider.get_tracer("test").start_as_current_span("caller") as caller:
        d.apply(f"{server.url}/multiply", kwargs={"x": 1, "y": 1}, headers={"traceparent": given})
    (call,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    assert parent_of(call) == id_of(caller)  # a current span wins


# -- threads and asyncio -------------------------------------------------------------------


def test_calls_from_many_threads_keep_their_own_parents(
    otel: Telemetry, make: Any, server: Server
) -> None:
    d = make()
    tracer = otel.tracer_provider.get_tracer("test")
    callers: dict[int, int] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with tracer.start_as_current_span(f"caller-{n}") as caller:
                callers[n] = id_of(caller)
                for _ in range(3):
                    d.call(f"{server.url}/multiply", x=n, y=1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not errors
    spans = otel.spans()
    calls = [s for s in spans if s.name == "dispatchkit.call"]
    assert len(calls) == 24
    for call in calls:
        n = int(str((call.attributes or {})["url.full"]).rpartition("x=")[2].partition("&")[0])
        assert parent_of(call) == callers[n]
        (attempt,) = attempts_of(call, spans)
        (served,) = [
            s for s in spans if s.kind == SpanKind.SERVER and parent_of(s) == id_of(attempt)
        ]
        assert (served.attributes or {})["url.query"] == f"x={n}&y=1"


def test_a_submitted_call_is_a_child_of_the_submitters_span(
    otel: Telemetry, make: Any, server: Server
) -> None:
    d = make()
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        assert d.submit(f"{server.url}/multiply", x=2, y=2).get(timeout=10) == 4
    (call,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    assert parent_of(call) == id_of(caller)


class Relay:
    """Makes a call of its own while each attempt of another call is prepared."""

    name = "relay"

    def __init__(self, inner: Dispatcher, url: str) -> None:
        self.inner = inner
        self.url = url

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        if request.url.startswith(self.url):
            return
        request.headers["X-Product"] = str(self.inner.call(self.url, x=2, y=3))


def test_a_call_made_while_another_is_prepared(otel: Telemetry, make: Any, server: Server) -> None:
    inner_url = f"{server.url}/multiply"
    outer = make(plugins=[otel.plugin(), Relay(make(), inner_url)])
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        assert outer.call(f"{server.url}/echo", a="1") == {"a": "1"}
    spans = otel.spans()
    calls = {
        str((s.attributes or {})["url.full"]): s for s in spans if s.name == "dispatchkit.call"
    }
    inner, outer_call = calls[f"{inner_url}?x=2&y=3"], calls[f"{server.url}/echo?a=1"]
    assert parent_of(inner) == parent_of(outer_call) == id_of(caller)
    (inner_attempt,) = attempts_of(inner, spans)
    (outer_attempt,) = attempts_of(outer_call, spans)
    assert server.front.traceparents("/multiply") == [traceparent(inner_attempt)]
    assert server.front.traceparents("/echo") == [traceparent(outer_attempt)]


def test_calls_left_behind_by_cancellations_are_bounded(otel: Telemetry) -> None:
    from dispatchkit_otel import _client

    plugin = otel.plugin()

    def abandon_many() -> int:
        requests = [
            Request("GET", f"http://127.0.0.1:1/t{n}", {}, {}, None, f"id{n}", 5.0)
            for n in range(3 * _client.MAX_DEPTH)
        ]
        for request in requests:
            request.attempt = 1
            plugin.dispatchkit_prepare_request(request)  # and nothing after: as if cancelled
        current = _client._CURRENT.get()
        assert current is not None
        assert current.request is requests[-1]
        return current.depth

    depth = contextvars.copy_context().run(abandon_many)
    assert depth <= _client.MAX_DEPTH


def test_a_submitted_call_carries_its_context_in_its_headers(
    otel: Telemetry, make: Any, server: Server
) -> None:
    d = make()
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        result = d.apply_async(f"{server.url}/multiply", kwargs={"x": 2, "y": 2}, headers=carrier)
        assert result.get(timeout=10) == 4
    (call,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    assert parent_of(call) == id_of(caller)


def test_async_dispatcher(otel: Telemetry, server: Server) -> None:
    tracer = otel.tracer_provider.get_tracer("test")

    async def main() -> tuple[int, list[int]]:
        async with AsyncDispatcher(timeout=5, retry_backoff=0.01, plugins=[otel.plugin()]) as d:
            with tracer.start_as_current_span("caller") as caller:
                one = await d.call(f"{server.url}/unavailable")
                assert one == "finally"
                many = await d.map(f"{server.url}/multiply", ({"x": i, "y": 3} for i in range(4)))
            return id_of(caller), many

    caller, many = asyncio.run(main())
    assert many == [0, 3, 6, 9]
    spans = otel.spans()
    calls = [s for s in spans if s.name == "dispatchkit.call"]
    assert len(calls) == 5
    assert all(parent_of(call) == caller for call in calls)
    attempts = {id_of(call): attempts_of(call, spans) for call in calls}
    assert sorted(len(a) for a in attempts.values()) == [1, 1, 1, 1, 2]
    served = otel.spans(SpanKind.SERVER)
    assert len(served) == 5
    every_attempt = {id_of(a) for group in attempts.values() for a in group}
    assert {parent_of(s) for s in served} <= every_attempt
    sent = [header for _, header in server.front.seen]
    assert sorted(str(h) for h in sent) == sorted(
        traceparent(a) for group in attempts.values() for a in group
    )


async def _cancelled_after(seconds: float, awaitable: Awaitable[object]) -> bool:
    """Await ``awaitable`` in this very task, cancelling the task after ``seconds``."""
    task = asyncio.current_task()
    assert task is not None
    handle = asyncio.get_running_loop().call_later(seconds, task.cancel)
    try:
        await awaitable
    except asyncio.CancelledError:
        if sys.version_info >= (3, 11):
            task.uncancel()  # as asyncio.timeout() does: the task itself goes on
        return True
    finally:
        handle.cancel()
    return False


def test_a_cancelled_call_leaves_nothing_behind(otel: Telemetry, server: Server) -> None:
    tracer = otel.tracer_provider.get_tracer("test")

    async def main() -> int:
        async with AsyncDispatcher(timeout=5, plugins=[otel.plugin()]) as d:
            with tracer.start_as_current_span("caller") as caller:
                slow = d.call(f"{server.url}/slow", seconds=1)
                assert await _cancelled_after(0.2, slow)  # the call, in this very task
                assert trace.get_current_span() is caller
                assert await d.call(f"{server.url}/multiply", x=2, y=5) == 10
            return id_of(caller)

    caller = asyncio.run(main())
    # No hook runs after a cancellation: that call's spans never end, so none is exported.
    (call,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    assert parent_of(call) == caller
    assert "x=2" in str((call.attributes or {})["url.full"])


class Options:
    """Keeps the options each call's attempt sees."""

    name = "options"

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, str]] = {}

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self.seen[request.task_id] = dict(request.options)


def test_a_submitted_call_carries_its_submitters_context_in_its_options(
    otel: Telemetry, make: Any, server: Server
) -> None:
    options = Options()
    d = make(plugins=[otel.plugin(), options])
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        result = d.submit(f"{server.url}/multiply", x=2, y=5)
        (many,) = d.submit_many(f"{server.url}/multiply", [{"x": 1, "y": 1}])
        assert [result.get(timeout=10), many.get(timeout=10)] == [10, 1]
    submitted = caller.get_span_context()
    flags = submitted.trace_flags
    expected = f"00-{submitted.trace_id:032x}-{submitted.span_id:016x}-{flags:02x}"
    assert options.seen[result.id] == {"otel_traceparent": expected}
    assert options.seen[many.id] == {"otel_traceparent": expected}
    calls = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    assert [parent_of(call) for call in calls] == [id_of(caller)] * 2
    # No span current at submit: nothing to carry, nothing added.
    assert d.submit(f"{server.url}/multiply", x=1, y=1).get(timeout=10) == 1
    assert list(options.seen.values())[-1] == {}


def test_a_call_whose_options_carry_a_context_is_its_child(
    otel: Telemetry, make: Any, server: Server
) -> None:
    # What a Celery worker runs: a Call with the submitter's context in its options, and
    # no span current. The options win over a traceparent header given with the call.
    d = make()
    carried = "00-" + "3" * 32 + "-" + "4" * 16 + "-01"
    header = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    call = Call(
        f"{server.url}/multiply",
        kwargs={"x": 3, "y": 3},
        headers={"traceparent": header},
        options={"otel_traceparent": carried, "otel_tracestate": "vendor=value"},
    )
    assert d.execute(call) == 9
    (span,) = [s for s in otel.spans() if s.name == "dispatchkit.call"]
    assert span.parent is not None
    assert (span.parent.trace_id, span.parent.span_id) == (int("3" * 32, 16), int("4" * 16, 16))
    assert span.parent.is_remote
    assert span.context is not None
    assert span.context.trace_state.get("vendor") == "value"
    (attempt,) = otel.spans(SpanKind.CLIENT)
    assert server.front.traceparents("/multiply") == [traceparent(attempt)]


def wait_points(otel: Telemetry) -> list[HistogramDataPoint]:
    return points(otel.metrics()["dispatchkit.client.connection.wait_time"])


def test_a_wait_for_a_full_pool_is_measured(otel: Telemetry, make: Any, server: Server) -> None:
    HELD.clear()
    d = make(pool_maxsize=1, timeout=10)
    holder = threading.Thread(target=d.call, args=(f"{server.url}/hold",), kwargs={"seconds": 0.4})
    holder.start()
    assert HELD.wait(10)  # the pool's one connection is taken for 0.4 s more
    assert d.call(f"{server.url}/multiply", x=2, y=3) == 6
    holder.join(10)
    assert d.call(f"{server.url}/multiply", x=2, y=3) == 6  # the pool is free: no wait
    (point,) = wait_points(otel)
    assert point.count == 1  # one attempt waited, the two others did not
    assert list(point.explicit_bounds) == [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10]
    assert dict(point.attributes or {}) == {
        "url.scheme": "http",
        "server.address": "127.0.0.1",
        "server.port": server.port,
    }
    assert point.sum > 0.2
    # The attempt that waited says so, and how long: what the histogram got.
    waited = [
        s
        for s in otel.spans(SpanKind.CLIENT)
        if "dispatchkit.client.connection.wait_time" in (s.attributes or {})
    ]
    (attempt,) = waited
    assert (attempt.attributes or {})["dispatchkit.client.connection.wait_time"] == point.sum
    assert str((attempt.attributes or {})["url.full"]).endswith("/multiply?x=2&y=3")


def test_a_wait_for_a_full_pool_is_measured_from_asyncio(otel: Telemetry, server: Server) -> None:
    HELD.clear()

    async def main() -> None:
        plugins = [otel.plugin()]
        async with AsyncDispatcher(timeout=10, pool_maxsize=1, plugins=plugins) as d:
            holder = asyncio.ensure_future(d.call(f"{server.url}/hold", seconds=0.4))
            assert await asyncio.to_thread(HELD.wait, 10)
            assert await d.call(f"{server.url}/multiply", x=1, y=4) == 4
            await holder

    asyncio.run(main())
    (point,) = wait_points(otel)
    assert point.count == 1
    assert point.sum > 0.2
    assert dict(point.attributes or {})["server.port"] == server.port


class Waits:
    """Keeps each attempt's pool wait."""

    name = "waits"

    def __init__(self) -> None:
        self.waits: list[float] = []

    @hookimpl
    def dispatchkit_attempt_done(self, request: Request, attempt: Attempt) -> None:
        self.waits.append(attempt.pool_wait)


def test_no_wait_is_recorded_while_the_pool_has_room(
    otel: Telemetry, make: Any, server: Server
) -> None:
    waits = Waits()
    d = make(pool_maxsize=4, plugins=[otel.plugin(), waits])
    results = d.map(f"{server.url}/slow", [{"seconds": 0.05}] * 4, concurrency=4)
    assert results == [0.05] * 4
    assert waits.waits == [0.0] * 4
    assert "dispatchkit.client.connection.wait_time" not in otel.metrics()


def breakers(otel: Telemetry) -> dict[tuple[int, str], int]:
    """``dispatchkit.circuit_breaker.state`` as collected now: (port, state) -> value."""
    metric = otel.metrics().get("dispatchkit.circuit_breaker.state")
    if metric is None:
        return {}
    found: dict[tuple[int, str], int] = {}
    for point in points(metric):
        attributes = dict(point.attributes)
        assert set(attributes) == {
            "url.scheme",
            "server.address",
            "server.port",
            "dispatchkit.circuit_breaker.state",
        }
        assert (attributes["url.scheme"], attributes["server.address"]) == ("http", "127.0.0.1")
        found[(attributes["server.port"], attributes["dispatchkit.circuit_breaker.state"])] = (
            point.value
        )
    return found


def state_of(port: int, state: str) -> dict[tuple[int, str], int]:
    return {(port, name): int(name == state) for name in ("closed", "open", "half-open")}


def test_breaker_states_are_a_gauge(otel: Telemetry, make: Any, server: Server) -> None:
    d = make(circuit_breaker={"failures": 1, "cooldown": 60}, retry_attempts=1)
    dead = free_port()
    with pytest.raises(ConnectError):
        d.call(f"http://127.0.0.1:{dead}/multiply", x=1, y=1)
    assert d.call(f"{server.url}/multiply", x=1, y=1) == 1
    assert breakers(otel) == {**state_of(dead, "open"), **state_of(server.port, "closed")}
    # What dispatcher.endpoints.list() says, read through the guard's public API.
    assert [(s.origin, s.breaker) for s in d.endpoints.list()] == sorted(
        [(f"http://127.0.0.1:{dead}", "open"), (server.url, "closed")]
    )
    assert d.endpoints.reset(f"http://127.0.0.1:{dead}")
    assert breakers(otel) == {**state_of(dead, "closed"), **state_of(server.port, "closed")}
    d.close()  # a closed dispatcher's guard is reported no more
    assert breakers(otel) == {}


def test_a_breaker_past_its_cooldown_is_half_open(otel: Telemetry, make: Any) -> None:
    d = make(circuit_breaker={"failures": 1, "cooldown": 0.05}, retry_attempts=1)
    dead = free_port()
    with pytest.raises(ConnectError):
        d.call(f"http://127.0.0.1:{dead}/multiply")
    time.sleep(0.1)  # past the cooldown: the next attempt is the probe
    assert breakers(otel) == state_of(dead, "half-open")


def test_no_breaker_no_gauge(otel: Telemetry, make: Any, server: Server) -> None:
    # A guard without breakers (a rate limit only), and a dispatcher with no guard at all.
    limited = make(rate_limits={"*": "100/s"})
    plain = make()
    assert limited.call(f"{server.url}/multiply", x=1, y=2) == 2
    assert plain.call(f"{server.url}/multiply", x=1, y=2) == 2
    assert [s.breaker for s in limited.endpoints.list()] == [None]
    assert breakers(otel) == {}


# -- the server side -------------------------------------------------------------------------


def test_the_task_runs_under_the_server_span(otel: Telemetry, make: Any, server: Server) -> None:
    d = make()
    for task in ("current", "current_async"):
        otel.exporter.clear()
        inside = d.call(f"{server.url}/{task}")
        (served,) = otel.spans(SpanKind.SERVER)
        assert inside == format(id_of(served), "016x")
        assert served.name == f"GET /{task}"
        attributes = served.attributes or {}
        assert attributes["http.route"] == f"/{task}"
        assert attributes["url.path"] == f"/{task}"
        assert attributes["url.scheme"] == "http"
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["server.port"] == server.port
        assert attributes["http.response.status_code"] == 200
        assert attributes["network.protocol.version"] == "1.1"
        assert str(attributes["user_agent.original"]).startswith("dispatchkit/")
        (server_duration,) = points(otel.metrics()["http.server.request.duration"])
        assert dict(server_duration.attributes) == {
            "http.request.method": "GET",
            "url.scheme": "http",
            "network.protocol.version": "1.1",
            "http.route": f"/{task}",
            "http.response.status_code": 200,
        }


def test_an_unknown_path_has_no_route(otel: Telemetry, make: Any, server: Server) -> None:
    d = make(retry_attempts=1)
    with pytest.raises(RemoteExecuteError):
        d.call(f"{server.url}/nowhere/{'x' * 10}")
    (served,) = otel.spans(SpanKind.SERVER)
    assert served.name == "GET"
    assert "http.route" not in (served.attributes or {})
    assert (served.attributes or {})["http.response.status_code"] == 404
    assert served.status.status_code == StatusCode.UNSET  # a 4xx is the client's


def test_asgi_middleware_continues_the_trace(otel: Telemetry) -> None:
    app = make_app()
    asgi = trace_asgi(app, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider)
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("remote attempt") as remote:
        parent = remote.get_span_context()
    header = f"00-{parent.trace_id:032x}-{parent.span_id:016x}-01"

    async def request(path: str, query: bytes) -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query,
            "headers": [(b"host", b"tasks.example:8080"), (b"traceparent", header.encode())],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(dict(message))

        await asyncio.wait_for(asgi(scope, receive, send), 10)
        return sent[0]["status"], sent[1]["body"]

    async def main() -> list[tuple[int, bytes]]:
        return [
            await request("/current_async", b""),
            await request("/broken", b"token=abc"),
        ]

    try:
        (ok, body), (failed, _) = asyncio.run(main())
    finally:
        app.close()
    assert (ok, failed) == (200, 500)
    current, broken = otel.spans(SpanKind.SERVER)
    assert parent_of(current) == parent.span_id
    assert current.context is not None
    assert current.context.trace_id == parent.trace_id
    assert json.loads(body)["retval"] == format(id_of(current), "016x")
    assert current.name == "GET /current_async"
    attributes = dict(current.attributes or {})
    assert attributes["server.address"] == "tasks.example"
    assert attributes["server.port"] == 8080
    assert attributes["client.address"] == "127.0.0.1"
    assert attributes["network.peer.port"] == 50000
    assert (broken.attributes or {})["error.type"] == "500"
    assert (broken.attributes or {})["url.query"] == "token=REDACTED"
    assert broken.status.status_code == StatusCode.ERROR


def test_asgi_middleware_passes_lifespan_through(otel: Telemetry) -> None:
    app = make_app()
    asgi = trace_asgi(app, tracer_provider=otel.tracer_provider)
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    asyncio.run(asyncio.wait_for(asgi({"type": "lifespan"}, receive, send), 10))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert otel.spans() == []


# -- metrics ------------------------------------------------------------------------------


def test_metrics_follow_the_conventions(otel: Telemetry, make: Any, server: Server) -> None:
    d = make()
    d.call(f"{server.url}/multiply", "POST", x=1, y=2)
    found = otel.metrics()
    request = found["http.client.request.duration"]
    assert request.unit == "s"
    (point,) = points(request)
    assert isinstance(point, HistogramDataPoint)
    assert list(point.explicit_bounds) == REQUEST_BUCKETS
    assert dict(point.attributes or {}) == {
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "server.port": server.port,
        "http.response.status_code": 200,
    }
    # The metric and the span measure the same thing.
    (attempt,) = otel.spans(SpanKind.CLIENT)
    start, end = times(attempt)
    assert point.sum == pytest.approx((end - start) / 1e9, abs=1e-6)
    call = found["dispatchkit.call.duration"]
    assert call.unit == "s"
    (call_point,) = points(call)
    assert call_point.sum >= point.sum
    assert "dispatchkit.call.retries" not in found  # one attempt: no retry


def test_prometheus_scrape(make: Any, server: Server) -> None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    reader = PrometheusMetricReader()  # registers with prometheus_client's REGISTRY
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    try:
        d = make(plugins=[OtelPlugin(meter_provider=provider)])
        d.call(f"{server.url}/multiply", x=3, y=3)
        httpd, thread = start_http_server(0, addr="127.0.0.1")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{httpd.server_port}/metrics", timeout=10
            ) as answer:
                text = answer.read().decode()
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(10)
    finally:
        provider.shutdown()  # unregisters the reader's collector
    bucket = "http_client_request_duration_seconds_bucket{"
    buckets = [line for line in text.splitlines() if line.startswith(bucket)]
    assert len(buckets) == len(REQUEST_BUCKETS) + 1  # and +Inf
    assert any('le="0.005"' in line for line in buckets)
    assert any('le="+Inf"' in line and line.endswith(" 1.0") for line in buckets)
    assert all('http_request_method="GET"' in line for line in buckets)
    assert all(f'server_port="{server.port}"' in line for line in buckets)
    assert "dispatchkit_call_duration_seconds_count" in text


# -- the entry point, with a global SDK ----------------------------------------------------

GLOBAL_SDK = """
import json
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from dispatchkit import Dispatcher
from dispatchkit.server import TaskApp

app = TaskApp()
seen = []

@app.task
def multiply(x: int, y: int) -> int:
    return x * y

def front(environ, start_response):
    seen.append(environ.get("HTTP_TRACEPARENT"))
    return app(environ, start_response)

early = Dispatcher(timeout=5)  # built before the SDK is set: dormant for its whole life
exporter = InMemorySpanExporter()
provider = TracerProvider(shutdown_on_exit=False)
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
from dispatchkit.server import TaskServer
with TaskServer(front) as server, Dispatcher(timeout=5) as late:
    early.call(server.url + "/multiply", x=1, y=1)
    late.call(server.url + "/multiply", x=2, y=2)
early.close()
spans = exporter.get_finished_spans()
print(json.dumps({
    "early": [p.plugin.active for p in early.plugins if p.name == "otel"],
    "late": [p.plugin.active for p in late.plugins if p.name == "otel"],
    "spans": [[s.name, s.kind.name, format(s.context.span_id, "016x")] for s in spans],
    "trace_ids": sorted({format(s.context.trace_id, "032x") for s in spans}),
    "seen": seen,
}))
"""


def test_the_entry_point_traces_with_the_global_sdk() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISPATCHKIT_DISABLE_PLUGIN_AUTOLOAD"}
    done = subprocess.run(
        [sys.executable, "-c", GLOBAL_SDK], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["early"] == [False]
    assert result["late"] == [True]
    names = [(name, kind) for name, kind, _ in result["spans"]]
    assert names == [("GET", "CLIENT"), ("dispatchkit.call", "INTERNAL")]
    (trace_id,) = result["trace_ids"]
    attempt_id = result["spans"][0][2]
    assert result["seen"][0] is None
    assert result["seen"][1].startswith(f"00-{trace_id}-{attempt_id}-")
