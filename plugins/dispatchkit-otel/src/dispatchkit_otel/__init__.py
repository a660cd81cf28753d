"""dispatchkit-otel: OpenTelemetry traces and metrics of dispatchkit calls.

Installed, it is the entry point ``otel`` of every Dispatcher and
AsyncDispatcher: configure OpenTelemetry's SDK first, and each call is a span
(``dispatchkit.call``) with an HTTP CLIENT span per attempt under it, following
the stable HTTP semantic conventions; the W3C ``traceparent`` of the attempt
goes out with it (the globally configured propagator); the meter
``dispatchkit`` records ``http.client.request.duration``,
``dispatchkit.call.duration``, ``dispatchkit.call.retries``,
``dispatchkit.attempt.refused``, ``dispatchkit.client.connection.wait_time``
(waits for a connection of a full pool) and ``dispatchkit.circuit_breaker.state``
(the endpoint guard's breakers). A call submitted to an executor carries its
submitter's span context in its options, so that it continues the trace on a
Celery worker too::

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())  # and its exporter
    with Dispatcher() as d:
        d.call(url, x=1)  # traced

With no SDK configured when a Dispatcher is built the plugin implements no
hook, and costs nothing. On the server side, :mod:`dispatchkit_otel.server`
wraps a TaskApp (WSGI or ASGI) so that it continues the caller's trace.
``Dispatcher(disable=["otel"])`` leaves the plugin out.
"""

from __future__ import annotations

from dispatchkit_otel._plugin import OtelPlugin, configured

__all__ = ["OtelPlugin", "configured"]
