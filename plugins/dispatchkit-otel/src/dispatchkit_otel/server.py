"""Continue the caller's trace on the server: one SERVER span per request.

TaskApp has no hook of its own for this; it is a WSGI application and
``app.asgi`` an ASGI one, so middleware wraps it::

    from dispatchkit.server import TaskApp, TaskServer
    from dispatchkit_otel.server import trace_asgi, trace_wsgi

    app = TaskApp()
    wsgi = trace_wsgi(app)  # for any WSGI server, or TaskServer(wsgi, port=8000)
    asgi = trace_asgi(app)  # for uvicorn: ``uvicorn tasks:asgi``

Each request's span is a child of the context its headers carry (the global
propagator extracts it: W3C ``traceparent`` by default), named and described
by the stable HTTP server conventions: ``{method} {http.route}``, where the
route is the task's path (``/multiply``) when the request names a registered
task of a TaskApp, and ``{method}`` alone otherwise. The span is current
while the task runs, so the task's own calls are its children; the meter
``dispatchkit`` records ``http.server.request.duration``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, StatusCode

from dispatchkit.server import TaskApp
from dispatchkit_otel._semconv import (
    CLIENT_ADDRESS,
    ERROR_TYPE,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
    NETWORK_PEER_ADDRESS,
    NETWORK_PEER_PORT,
    NETWORK_PROTOCOL_VERSION,
    REQUEST_BUCKETS,
    SCHEMA_URL,
    SCOPE,
    SCOPE_VERSION,
    SERVER_ADDRESS,
    SERVER_PORT,
    SERVER_REQUEST_DURATION,
    URL_PATH,
    URL_QUERY,
    URL_SCHEME,
    USER_AGENT_ORIGINAL,
    error_type,
    host_server,
    known_methods,
    method_attributes,
    redact_query,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

__all__ = ["TracedASGI", "TracedWSGI", "trace_asgi", "trace_wsgi"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApplication = Callable[[Scope, Receive, Send], Awaitable[None]]


def trace_wsgi(
    app: WSGIApplication,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> TracedWSGI:
    """``app`` (a TaskApp, or any WSGI application) with a SERVER span per request."""
    return TracedWSGI(app, _Telemetry(app, tracer_provider, meter_provider))


def trace_asgi(
    app: TaskApp | ASGIApplication,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> TracedASGI:
    """A TaskApp's ``asgi`` (or any ASGI 3 application) with a SERVER span per request.

    Scopes other than ``http`` (``lifespan``, ``websocket``) pass through untraced.
    """
    telemetry = _Telemetry(app, tracer_provider, meter_provider)
    return TracedASGI(app.asgi if isinstance(app, TaskApp) else app, telemetry)


class _Telemetry:
    """The tracer, the duration histogram and the routes of one wrapped application."""

    def __init__(
        self,
        app: object,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
    ) -> None:
        self.tracer = trace.get_tracer(SCOPE, SCOPE_VERSION, tracer_provider, SCHEMA_URL)
        meter = metrics.get_meter(SCOPE, SCOPE_VERSION or "", meter_provider, SCHEMA_URL)
        self.duration = meter.create_histogram(
            SERVER_REQUEST_DURATION,
            unit="s",
            description="Duration of HTTP server requests.",
            explicit_bucket_boundaries_advisory=REQUEST_BUCKETS,
        )
        self.methods = known_methods()
        # A TaskApp's tasks are its routes (a live view: tasks registered later count too).
        self.taskapp = isinstance(app, TaskApp)
        self.tasks: Mapping[str, object] = app.tasks if isinstance(app, TaskApp) else {}

    def start(
        self,
        carrier: Any,
        getter: Getter[Any],
        method: str,
        root: str,
        path: str,
        request: dict[str, AttributeValue],
    ) -> tuple[Span, context.Context, dict[str, AttributeValue], float]:
        """Open the request's span; return it, its context, the metric's attributes, a clock."""
        parent = propagate.extract(carrier, getter=getter)
        name, attributes = method_attributes(method, self.methods)
        measured: dict[str, AttributeValue] = dict(attributes)
        measured[URL_SCHEME] = request[URL_SCHEME]
        if NETWORK_PROTOCOL_VERSION in request:
            measured[NETWORK_PROTOCOL_VERSION] = request[NETWORK_PROTOCOL_VERSION]
        route = self.route(root, path)
        if route is not None:
            name = f"{name} {route}"
            measured[HTTP_ROUTE] = route
        span = self.tracer.start_span(
            name, parent, SpanKind.SERVER, {**request, **measured, URL_PATH: root + path}
        )
        return span, trace.set_span_in_context(span, parent), measured, time.perf_counter()

    def route(self, root: str, path: str) -> str | None:
        if path in ("", "/"):
            return root + "/" if self.taskapp else None
        if path.startswith("/") and path[1:] in self.tasks:
            return root + path
        return None

    def end(
        self,
        span: Span,
        measured: dict[str, AttributeValue],
        clock: float,
        status: int | None,
        exc: BaseException | None,
    ) -> None:
        """End the request's span: 5xx and exceptions are errors, 4xx are the client's."""
        duration = time.perf_counter() - clock
        if status is not None:
            span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
            measured[HTTP_RESPONSE_STATUS_CODE] = status
        error: str | None = None
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            error = error_type(exc)
            span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        elif status is not None and status >= 500:
            error = str(status)
            span.set_status(StatusCode.ERROR)
        if error is not None:
            span.set_attribute(ERROR_TYPE, error)
            measured[ERROR_TYPE] = error
        span.end()
        self.duration.record(duration, measured)


# -- WSGI --------------------------------------------------------------------------------


class _EnvironGetter(Getter["WSGIEnvironment"]):
    """Reads request headers from a WSGI environ (``traceparent`` is ``HTTP_TRACEPARENT``)."""

    def get(self, carrier: WSGIEnvironment, key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return None if value is None else [value]

    def keys(self, carrier: WSGIEnvironment) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


_ENVIRON = _EnvironGetter()


def _wsgi_text(value: str) -> str:
    """A PEP 3333 string (the request's bytes as latin-1) as the UTF-8 text it was sent as."""
    try:
        return value.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # not latin-1: it was text already
        return value


class TracedWSGI:
    """A WSGI application whose every request is a SERVER span; see :func:`trace_wsgi`."""

    def __init__(self, app: WSGIApplication, telemetry: _Telemetry) -> None:
        self.app = app
        self._telemetry = telemetry

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        scheme = environ.get("wsgi.url_scheme", "http")
        request: dict[str, AttributeValue] = {URL_SCHEME: scheme}
        _wsgi_request(environ, scheme, request)
        span, ctx, measured, clock = self._telemetry.start(
            environ,
            _ENVIRON,
            environ.get("REQUEST_METHOD", ""),
            _wsgi_text(environ.get("SCRIPT_NAME", "")),
            _wsgi_text(environ.get("PATH_INFO", "")),
            request,
        )
        status: list[int] = []

        def traced_start_response(
            status_line: str, headers: list[tuple[str, str]], exc_info: Any = None, /
        ) -> Callable[[bytes], object]:
            code = status_line.partition(" ")[0]
            status[:] = [int(code)] if code.isdigit() else []
            return start_response(status_line, headers, exc_info)

        def done(exc: BaseException | None) -> None:
            self._telemetry.end(span, measured, clock, status[0] if status else None, exc)

        token = context.attach(ctx)
        try:
            body = self.app(environ, traced_start_response)
        except BaseException as exc:
            done(exc)
            raise
        finally:
            context.detach(token)
        if isinstance(body, (list, tuple)):  # already complete, as a TaskApp's always is
            done(None)
            return body
        return _Body(body, done)


def _wsgi_request(
    environ: WSGIEnvironment, scheme: str, request: dict[str, AttributeValue]
) -> None:
    """The request's attributes that do not depend on the route, from ``environ``."""
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
    address, port = host_server(host, scheme)
    if address:
        request[SERVER_ADDRESS] = address
        if port is not None:
            request[SERVER_PORT] = port
    query = environ.get("QUERY_STRING", "")
    if query:
        request[URL_QUERY] = redact_query(_wsgi_text(query))
    protocol = environ.get("SERVER_PROTOCOL", "")
    if protocol.startswith("HTTP/"):
        request[NETWORK_PROTOCOL_VERSION] = protocol[5:]
    peer = environ.get("REMOTE_ADDR")
    if peer:
        request[NETWORK_PEER_ADDRESS] = request[CLIENT_ADDRESS] = peer
        peer_port = environ.get("REMOTE_PORT", "")
        if peer_port.isdigit():
            request[NETWORK_PEER_PORT] = int(peer_port)
    agent = environ.get("HTTP_USER_AGENT")
    if agent:
        request[USER_AGENT_ORIGINAL] = agent


class _Body:
    """A streamed WSGI body: the span ends when the server closes it (PEP 3333)."""

    def __init__(self, body: Iterable[bytes], done: Callable[[BaseException | None], None]):
        self._body = body
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        error: BaseException | None = None
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._done(error)


# -- ASGI --------------------------------------------------------------------------------


class _HeadersGetter(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_HEADERS = _HeadersGetter()


class TracedASGI:
    """An ASGI 3 application whose every HTTP request is a SERVER span; see :func:`trace_asgi`."""

    def __init__(self, app: ASGIApplication, telemetry: _Telemetry) -> None:
        self.app = app
        self._telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        scheme = scope.get("scheme", "http")
        request: dict[str, AttributeValue] = {URL_SCHEME: scheme}
        _asgi_request(scope, headers, scheme, request)
        span, ctx, measured, clock = self._telemetry.start(
            headers,
            _HEADERS,
            scope.get("method", ""),
            scope.get("root_path", ""),
            scope.get("path", ""),
            request,
        )
        status: list[int] = []

        async def traced_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[:] = [int(message["status"])]
            await send(message)

        token = context.attach(ctx)
        try:
            await self.app(scope, receive, traced_send)
        except BaseException as exc:
            self._telemetry.end(span, measured, clock, status[0] if status else None, exc)
            raise
        else:
            self._telemetry.end(span, measured, clock, status[0] if status else None, None)
        finally:
            context.detach(token)


def _asgi_request(
    scope: Scope, headers: Mapping[str, str], scheme: str, request: dict[str, AttributeValue]
) -> None:
    """The request's attributes that do not depend on the route, from the ASGI ``scope``."""
    server = scope.get("server")
    host = headers.get("host") or (f"{server[0]}:{server[1]}" if server else "")
    address, port = host_server(host, scheme)
    if address:
        request[SERVER_ADDRESS] = address
        if port is not None:
            request[SERVER_PORT] = port
    query = scope.get("query_string", b"")
    if query:
        request[URL_QUERY] = redact_query(query.decode("utf-8", "replace"))
    version = scope.get("http_version")
    if version:
        request[NETWORK_PROTOCOL_VERSION] = version
    client = scope.get("client")
    if client:
        request[NETWORK_PEER_ADDRESS] = request[CLIENT_ADDRESS] = client[0]
        request[NETWORK_PEER_PORT] = client[1]
    agent = headers.get("user-agent")
    if agent:
        request[USER_AGENT_ORIGINAL] = agent
