"""A Celery worker app that traces: ``dispatchkit_celery.worker``'s app, with an SDK set.

``celery_worker(..., app="support.traced_worker")`` starts it (``tests/`` must
be on the worker's ``PYTHONPATH``). Before the plugin's app is imported, the
OpenTelemetry SDK becomes the global tracer provider, so every worker process's
Dispatcher gets an active ``otel`` plugin (the entry point), as a deployment
that configures OpenTelemetry in its worker module would. Each finished span
is appended to the file named by ``DISPATCHKIT_TEST_SPANS``, one line of
``ReadableSpan.to_json()`` each, by every process of the worker (a forked pool
process inherits the provider, and writes as it ends a span).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

SPANS_ENV = "DISPATCHKIT_TEST_SPANS"


class JsonLinesExporter(SpanExporter):
    """Appends each span to a file as one line of JSON."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(span.to_json(indent=None) + "\n" for span in spans)
        with open(self.path, "a", encoding="utf-8") as out:  # one write per batch
            out.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ[SPANS_ENV])))
trace.set_tracer_provider(provider)

from dispatchkit_celery.worker import app  # noqa: E402  (after the SDK: its Dispatchers trace)

__all__ = ["app"]
