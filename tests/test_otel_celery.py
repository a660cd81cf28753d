"""dispatchkit-otel across a Celery broker: the worker's call span continues the submitter's trace.

Real parts: a Redis broker (database 5, this module's own, emptied before and
after), a prefork worker subprocess whose app (``support.traced_worker``) sets
OpenTelemetry's SDK as its global tracer provider and appends every finished
span to a file, and a TaskApp on loopback. The submitting side uses the
plugin with providers of its own (no global SDK in the test process).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from dispatchkit_celery.testing import REDIS_URL, celery_worker
from dispatchkit_otel import OtelPlugin
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span

from dispatchkit import Dispatcher
from dispatchkit.server import TaskApp
from support.celery_env import eventually, redis_db

pytestmark = pytest.mark.timeout(90)

URL = urlunsplit(urlsplit(REDIS_URL)._replace(path="/5"))
QUEUE = f"dispatchkit-otel-{uuid.uuid4().hex[:8]}"
TESTS = Path(__file__).resolve().parent
#: Where the worker writes its spans (support/traced_worker.py, never imported here: it sets
#: the global provider of the process that imports it).
SPANS_ENV = "DISPATCHKIT_TEST_SPANS"


@pytest.fixture(scope="module")
def task_url() -> Iterator[str]:
    app = TaskApp()

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    with app.server(port=0) as server:
        yield f"{server.url}/multiply"
    app.close()


def _hex(span: Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return f"0x{ctx.trace_id:032x}", f"0x{ctx.span_id:016x}"


def _worker_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_worker_call_is_a_child_of_the_submitting_span(
    task_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans_file = tmp_path / "worker-spans.jsonl"
    monkeypatch.setenv(SPANS_ENV, str(spans_file))
    monkeypatch.delenv("DISPATCHKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)  # the worker's otel
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), path])))

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with (
        redis_db(URL) as broker,
        celery_worker(QUEUE, concurrency=1, url=broker, app="support.traced_worker"),
        Dispatcher(
            executor="celery",
            celery_broker=broker,
            celery_queue=QUEUE,
            celery_get_timeout=30,
            plugins=[OtelPlugin(tracer_provider=provider)],
        ) as d,
    ):
        with tracer.start_as_current_span("submit one") as one:
            single = d.submit(task_url, x=6, y=7)
        with tracer.start_as_current_span("submit many") as many:
            batch = d.submit_many(task_url, [{"x": 2, "y": 3}, {"x": 4, "y": 5}])
        with tracer.start_as_current_span("map") as mapping:
            mapped = d.map(task_url, [{"x": 1, "y": 1}])
        assert single.get(timeout=30) == 42
        assert [r.get(timeout=30) for r in batch] == [6, 20]
        assert mapped == [1]
        # Every call's span ends (and is written) before its result is stored.
        assert eventually(lambda: len(_worker_calls(spans_file)) == 4, timeout=10)
    provider.shutdown()

    calls = {call["attributes"]["dispatchkit.task_id"]: call for call in _worker_calls(spans_file)}
    expected = {single.id: one, batch[0].id: many, batch[1].id: many}
    for task_id, submitter in expected.items():
        trace_id, span_id = _hex(submitter)
        call = calls.pop(task_id)
        assert call["context"]["trace_id"] == trace_id
        assert call["parent_id"] == span_id
        assert call["kind"] == "SpanKind.INTERNAL"
    (mapped_call,) = calls.values()
    assert (mapped_call["context"]["trace_id"], mapped_call["parent_id"]) == _hex(mapping)
    # The attempts under the calls are the worker's, in the same traces.
    attempts = [s for s in _worker_spans(spans_file) if s["kind"] == "SpanKind.CLIENT"]
    assert len(attempts) == 4
    call_ids = {s["context"]["span_id"] for s in _worker_calls(spans_file)}
    assert {attempt["parent_id"] for attempt in attempts} == call_ids
    # The submitting process made no span of those calls: they ran on the worker.
    assert [s.name for s in exporter.get_finished_spans()] == ["submit one", "submit many", "map"]


def _worker_calls(path: Path) -> list[dict[str, Any]]:
    return [span for span in _worker_spans(path) if span["name"] == "dispatchkit.call"]
