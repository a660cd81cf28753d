"""Spans and metrics of calls, started and ended from the per-call hooks.

A call's span opens at its first attempt's ``dispatchkit_prepare_request``
(no hook runs earlier in a call), as a child of the context current there:
the caller's, since the pipeline runs a call in the caller's thread or task.
Each attempt is an HTTP CLIENT span under it, from ``prepare_request`` to
``dispatchkit_attempt_done``; the call's span ends at ``dispatchkit_call_done``.

Between those hooks a call's state lives in a context variable, never in a
table keyed by request: each thread, and each asyncio task, has a context of
its own, so concurrent calls never meet, and the state of a call cancelled
mid-way (no hook runs after a cancellation) goes with its task instead of
piling up. Nothing is attached to the current context: the call and attempt
contexts are passed explicitly, so that a cancellation cannot leave a span
current in the caller's context.

A call handed to an executor (``submit``, ``map``, ...) may run in another
process, a Celery worker: ``dispatchkit_submit_options`` puts the submitter's
span context into the call's options (:func:`submit_options`), which travel
with it, and the call's span takes it as its parent where it runs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dispatchkit_otel._breakers import breaker_gauge
from dispatchkit_otel._semconv import (
    ATTEMPT,
    ATTEMPTS,
    ATTEMPTS_REFUSED,
    CALL_BUCKETS,
    CALL_DURATION,
    CALL_RETRIES,
    CALL_SPAN,
    CLIENT_REQUEST_DURATION,
    CONNECTION_WAIT_TIME,
    DEFAULT_KNOWN_METHODS,
    ERROR_TYPE,
    HTTP_REQUEST_RESEND_COUNT,
    HTTP_RESPONSE_STATUS_CODE,
    REFUSED_EVENT,
    REQUEST_BUCKETS,
    SCHEMA_URL,
    SCOPE,
    SCOPE_VERSION,
    SERVER_ADDRESS,
    SERVER_PORT,
    TASK_ID,
    URL_FULL,
    URL_SCHEME,
    WAIT_BUCKETS,
    method_attributes,
    redact_url,
    url_server,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

    from dispatchkit import Attempt, EndpointGuard, Outcome, Request

    Attributes = dict[str, AttributeValue]


class _Headers(Getter[dict[str, str]], Setter[dict[str, str]]):
    """Reads and sets propagation headers whatever the case of their names.

    Setting one replaces a header of the same name in another case: a request
    never carries two ``traceparent`` headers.
    """

    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        found = [value for name, value in carrier.items() if name.lower() == key]
        return found or None

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return [name.lower() for name in carrier]

    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        for name in [name for name in carrier if name != key and name.lower() == key]:
            del carrier[name]
        carrier[key] = value


_HEADERS = _Headers()

#: The options a submitted call carries its submitter's span context in: W3C trace context
#: whatever the propagators on the wire, since the plugin reads them back itself. No baggage:
#: it may hold anything, and options are kept in broker messages and delivery records.
OPTION_PREFIX = "otel_"
TRACEPARENT_OPTION = OPTION_PREFIX + "traceparent"
#: The most an option's value may hold (``tracestate`` may be longer: then it stays behind).
OPTION_VALUE_MAX = 256
_TRACE_CONTEXT = TraceContextTextMapPropagator()


class _Options(Getter[Mapping[str, str]]):
    """Reads the trace context :func:`submit_options` put into a call's options."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(OPTION_PREFIX + key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return [name[len(OPTION_PREFIX) :] for name in carrier if name.startswith(OPTION_PREFIX)]


_OPTIONS = _Options()


def submit_options() -> dict[str, str] | None:
    """The current span's context as options of a call (``otel_traceparent``, and
    ``otel_tracestate`` when it has one that fits), or ``None`` without a span."""
    carrier: dict[str, str] = {}
    _TRACE_CONTEXT.inject(carrier)
    if not carrier:
        return None
    return {
        OPTION_PREFIX + name: value
        for name, value in carrier.items()
        if len(value) <= OPTION_VALUE_MAX and value.isascii() and value.isprintable()
    }


#: How many calls may be in progress within one another, in one context.
MAX_DEPTH = 8


class _Call:
    """One call in progress: its span, the attributes its attempts share, the open attempt."""

    __slots__ = (
        "attempt",
        "attempt_clock",
        "attempt_start",
        "attributes",
        "context",
        "depth",
        "measured",
        "name",
        "outer",
        "pool",
        "request",
        "span",
    )

    def __init__(
        self,
        request: Request,
        span: Span,
        parent: context.Context,
        name: str,
        attributes: Attributes,
        measured: Attributes,
        pool: Attributes,
        outer: _Call | None,
    ) -> None:
        self.request = request
        self.span = span
        self.context = trace.set_span_in_context(span, parent)
        self.name = name  # of its attempts' spans: the method
        self.attributes = attributes  # of its attempts' spans, at their start
        self.measured = measured  # of its metrics
        self.pool = pool  # of its waits for a pooled connection: the origin
        # The call current before this one: one it runs within (a hook of that call made
        # this one), or one cancelled mid-way, whose state stays behind. Links are bounded,
        # so that a task cancelling call after call keeps a few, not all of them.
        if outer is not None and outer.depth >= MAX_DEPTH:
            outer = None
        self.outer = outer
        self.depth: int = 0 if outer is None else outer.depth + 1
        self.attempt: Span | None = None
        self.attempt_start = 0  # ns since the epoch
        self.attempt_clock = 0.0  # time.perf_counter()


#: The innermost call in progress in this context (a thread's, an asyncio task's).
_CURRENT: ContextVar[_Call | None] = ContextVar("dispatchkit_otel_call", default=None)


def _find(request: Request) -> _Call | None:
    call = _CURRENT.get()
    while call is not None and call.request is not request:
        call = call.outer
    return call


class ClientTelemetry:
    """What :class:`~dispatchkit_otel.OtelPlugin`'s hooks do, once per Dispatcher."""

    def __init__(
        self, tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None
    ) -> None:
        self._tracer = trace.get_tracer(SCOPE, SCOPE_VERSION, tracer_provider, SCHEMA_URL)
        meter = metrics.get_meter(SCOPE, SCOPE_VERSION or "", meter_provider, SCHEMA_URL)
        self._request_duration = meter.create_histogram(
            CLIENT_REQUEST_DURATION,
            unit="s",
            description="Duration of HTTP client requests: one per attempt that was sent.",
            explicit_bucket_boundaries_advisory=REQUEST_BUCKETS,
        )
        self._call_duration = meter.create_histogram(
            CALL_DURATION,
            unit="s",
            description="Duration of dispatchkit calls, every attempt and wait included.",
            explicit_bucket_boundaries_advisory=CALL_BUCKETS,
        )
        self._retries = meter.create_counter(
            CALL_RETRIES,
            unit="{attempt}",
            description="Attempts of a call after its first: each one a retry.",
        )
        self._refused = meter.create_counter(
            ATTEMPTS_REFUSED,
            unit="{attempt}",
            description="Attempts that ended before anything was sent (the endpoint guard "
            "refused them, or a plugin failed before this one prepared them).",
        )
        self._pool_wait = meter.create_histogram(
            CONNECTION_WAIT_TIME,
            unit="s",
            description="Time attempts waited for a connection because every connection of "
            "the origin's pool was in use (pool_maxsize): one per attempt that waited.",
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
        )
        self._meter = meter
        self._guards: list[EndpointGuard] = []

    # -- the endpoint guard's breakers --------------------------------------------------

    def watch(self, guard: EndpointGuard) -> None:
        """Report ``guard``'s breakers (``dispatchkit.circuit_breaker.state``) until closed."""
        breaker_gauge(self._meter).watch(guard)
        self._guards.append(guard)

    def close(self) -> None:
        """The dispatcher is closed: its guard's breakers are reported no more."""
        guards, self._guards = self._guards, []
        for guard in guards:
            breaker_gauge(self._meter).unwatch(guard)

    # -- the hooks ----------------------------------------------------------------------

    def attempt_starts(self, request: Request) -> None:
        """``dispatchkit_prepare_request``: open the attempt's span, inject its context."""
        call = _find(request) or self._call_starts(request, time.time_ns())
        attributes = call.attributes
        if request.attempt > 1:
            attributes = {**attributes, HTTP_REQUEST_RESEND_COUNT: request.attempt - 1}
        start = time.time_ns()
        span = self._tracer.start_span(
            call.name, call.context, SpanKind.CLIENT, attributes, start_time=start
        )
        call.attempt, call.attempt_start, call.attempt_clock = span, start, time.perf_counter()
        propagate.inject(request.headers, trace.set_span_in_context(span, call.context), _HEADERS)

    def attempt_ends(self, request: Request, attempt: Attempt) -> None:
        """``dispatchkit_attempt_done``: end the attempt's span, record its duration."""
        call = _find(request)
        if call is None:  # refused before its first attempt was prepared
            call = self._call_starts(request, round(attempt.started * 1e9))
        span, call.attempt = call.attempt, None
        if attempt.number > 1:
            self._retries.add(1, call.measured)
        if attempt.pool_wait:
            self._pool_wait.record(attempt.pool_wait, call.pool)
            if span is not None:
                span.set_attribute(CONNECTION_WAIT_TIME, attempt.pool_wait)
        if span is None:  # nothing was sent: no HTTP span, no request duration
            self._refused.add(1, {**call.measured, ERROR_TYPE: attempt.outcome})
            call.span.add_event(
                REFUSED_EVENT, {ATTEMPT: attempt.number, ERROR_TYPE: attempt.outcome}
            )
            return
        duration = time.perf_counter() - call.attempt_clock
        measured = dict(call.measured)
        status = attempt.status
        if status is None:
            error: str | None = attempt.outcome  # the error's class: nothing came back
        else:
            span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
            measured[HTTP_RESPONSE_STATUS_CODE] = status
            error = str(status) if status >= 400 else None
        if error is not None:
            span.set_attribute(ERROR_TYPE, error)
            measured[ERROR_TYPE] = error
            # A status says it all; an error without one says what happened.
            span.set_status(StatusCode.ERROR, attempt.error if status is None else None)
        # The span lasts exactly what the metric records.
        span.end(call.attempt_start + round(duration * 1e9))
        self._request_duration.record(duration, measured)

    def call_ends(self, request: Request, outcome: Outcome) -> None:
        """``dispatchkit_call_done``: end the call's span, record its duration."""
        call = _find(request)
        if call is None:  # it failed before any attempt (no transport for its scheme)
            call = self._call_starts(request, time.time_ns() - round(outcome.duration * 1e9))
        if _CURRENT.get() is call:
            _CURRENT.set(call.outer)
        if call.attempt is not None:  # an attempt_done that never came (a plugin's doing)
            call.attempt.end()
        span = call.span
        span.set_attribute(ATTEMPTS, outcome.attempts)
        measured = call.measured
        error = outcome.error
        if error is not None:
            kind = type(error).__name__
            span.set_attribute(ERROR_TYPE, kind)
            span.set_status(StatusCode.ERROR, str(error))
            measured = {**measured, ERROR_TYPE: kind}
        span.end()
        self._call_duration.record(outcome.duration, measured)

    # -- helpers ------------------------------------------------------------------------

    def _call_starts(self, request: Request, start: int) -> _Call:
        """Open the call's span and make the call current.

        Its parent is the current context; without a span there, the context
        of its submitter, carried in its options (:func:`submit_options`: a
        call run by an executor, on a Celery worker too); without one, the
        context its headers carry (``Dispatcher.apply(..., headers=...)``), if any.
        """
        name, method = method_attributes(request.method, DEFAULT_KNOWN_METHODS)
        attributes: Attributes = dict(method)
        address, port = url_server(request.url)
        attributes[SERVER_ADDRESS] = address
        if port is not None:
            attributes[SERVER_PORT] = port
        measured: Attributes = dict(attributes)
        scheme = request.url.partition(":")[0].lower()
        pool: Attributes = {URL_SCHEME: scheme, SERVER_ADDRESS: address}
        if port is not None:
            pool[SERVER_PORT] = port
        attributes[URL_FULL] = redact_url(request.url)
        parent = context.get_current()
        if not _has_span(parent) and TRACEPARENT_OPTION in request.options:
            parent = _TRACE_CONTEXT.extract(request.options, parent, _OPTIONS)
        if not _has_span(parent):
            parent = propagate.extract(request.headers, parent, _HEADERS)
        span = self._tracer.start_span(
            CALL_SPAN,
            parent,
            SpanKind.INTERNAL,
            {**attributes, TASK_ID: request.task_id},
            start_time=start,
        )
        call = _Call(request, span, parent, name, attributes, measured, pool, _CURRENT.get())
        _CURRENT.set(call)
        return call


def _has_span(parent: context.Context) -> bool:
    return trace.get_current_span(parent).get_span_context().is_valid
