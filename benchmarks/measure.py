"""Measuring the client matrix against one server: warm-ups, alternating rounds, medians.

Noise on a small shared machine drifts over seconds, so no client is measured
in one block: each is warmed up (its connections opened, its caches filled,
and a sample size chosen so that a sample lasts about ``sample_s``), then the
rounds go A B C ... A B C ..., and each client's figure is the median of its
rounds. The server's connection counter is read around every sample, so the
connections each client opened are exact (one thing runs at a time). This
process's CPU time is taken with each sequential sample too: unlike wall time
it does not include the wake-ups of a blocked thread, which on a VM cost tens
of µs per call when a vCPU has gone idle, and add to every client alike.

``run_matrix(plan)`` runs in this process for loopback, and in a child
process inside the client's network namespace for the RTT runs
(``python -m benchmarks.worker`` reads the plan on stdin, prints JSON).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from benchmarks import clients
from benchmarks.progress import Progress
from benchmarks.servers import Stats

T = TypeVar("T")


@dataclass
class Plan:
    """What to measure, where; plain data so that it crosses into a namespace as JSON."""

    title: str
    urls: dict[str, str]  # base URL by scheme
    ca: str | None
    stats_kind: str  # "target", "nginx" or "" (no counter)
    sequential: list[str] = field(default_factory=lambda: list(clients.SEQUENTIAL))
    schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    rounds: int = 15
    sample_s: float = 0.1
    warmup_s: float = 0.3
    min_calls: int = 3
    max_calls: int = 5000
    concurrency: list[str] = field(default_factory=lambda: list(clients.CONCURRENT))
    concurrency_schemes: list[str] = field(default_factory=lambda: ["http"])
    threads: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    concurrency_rounds: int = 7
    batch: int = 1000
    capacity: bool = True


class DiscardCounter(logging.Handler):
    """Counts urllib3's "Connection pool is full, discarding connection" (and hides it)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "pool is full" in record.getMessage():
            self.count += 1

    def install(self) -> None:
        logger = logging.getLogger("urllib3.connectionpool")
        logger.addHandler(self)
        logger.propagate = False


@dataclass
class Meter:
    """Reads the counters around each piece of work."""

    stats: Stats
    discards: DiscardCounter
    cpu: float = 0.0  # this process's CPU seconds in the last piece of work

    def __call__(self, row: dict[str, Any], work: Callable[..., T], *args: Any) -> tuple[float, T]:
        conns, discards = self.stats.connections(), self.discards.count
        cpu, started = time.process_time(), time.perf_counter()
        result = work(*args)
        elapsed = time.perf_counter() - started
        self.cpu = time.process_time() - cpu
        after = self.stats.connections()
        if conns is None or after is None or row["connections"] is None:
            row["connections"] = None
        else:
            row["connections"] += after - conns
        row["discarded"] += self.discards.count - discards
        return elapsed, result


def _row(label: str, unit: str) -> dict[str, Any]:
    return {"label": label, "unit": unit, "samples": [], "median": None, "cpu_samples": [],
            "cpu_median": None, "calls": 0, "total_calls": 0, "connections": 0, "discarded": 0,
            "error": None}  # fmt: skip


def _fail(row: dict[str, Any], exc: BaseException) -> None:
    row["error"] = f"{type(exc).__name__}: {exc}"[:300]


def _check(values: list[Any]) -> None:
    wrong = [v for v in values if v != clients.RETVAL]
    if wrong:
        raise AssertionError(f"retval {wrong[0]!r}, expected {clients.RETVAL}")


def sequential(plan: Plan, scheme: str, meter: Meter) -> dict[str, dict[str, Any]]:
    """µs per call of every sequential client, median of alternating rounds."""
    endpoint = clients.Endpoint(plan.urls[scheme], plan.ca)
    keys = [k for k in plan.sequential if k not in clients.missing(clients.SEQUENTIAL)]
    rows = {k: _row(clients.SEQUENTIAL[k].label, "us/call") for k in keys}
    made: dict[str, clients.Client] = {}
    progress = Progress(f"{plan.title} {scheme}", len(keys) * (plan.rounds + 1))
    try:
        for key in keys:
            row = rows[key]
            progress.step(f"warm-up: {row['label']}")
            try:
                made[key] = client = clients.SEQUENTIAL[key].make(endpoint)
                elapsed, count = meter(row, _warm, client.call, plan)
            except Exception as exc:
                _fail(row, exc)
                made.pop(key, None)
                continue
            row["total_calls"] += count
            per_call = elapsed / count
            row["calls"] = max(plan.min_calls, min(plan.max_calls, round(plan.sample_s / per_call)))
        for number in range(1, plan.rounds + 1):
            for key, client in list(made.items()):
                row = rows[key]
                progress.step(f"round {number}/{plan.rounds}: {row['label']}")
                n = row["calls"]
                try:
                    elapsed, _ = meter(row, _repeat, client.call, n)
                except Exception as exc:
                    _fail(row, exc)
                    made.pop(key).close()
                    continue
                row["samples"].append(elapsed / n * 1e6)
                row["cpu_samples"].append(meter.cpu / n * 1e6)
                row["total_calls"] += n
    finally:
        for client in made.values():
            client.close()
        progress.close()
    for row in rows.values():
        if row["samples"]:
            row["median"] = statistics.median(row["samples"])
            row["cpu_median"] = statistics.median(row["cpu_samples"])
    return rows


def _warm(call: Callable[[], Any], plan: Plan) -> int:
    _check([call()])
    count, deadline = 1, time.perf_counter() + plan.warmup_s
    while count < plan.min_calls or time.perf_counter() < deadline:
        call()
        count += 1
    return count


def _repeat(call: Callable[[], Any], n: int) -> None:
    for _ in range(n):
        call()


def concurrency(plan: Plan, scheme: str, meter: Meter) -> dict[str, dict[str, dict[str, Any]]]:
    """Calls per second of every concurrent client at each thread count."""
    endpoint = clients.Endpoint(plan.urls[scheme], plan.ca)
    keys = [k for k in plan.concurrency if k not in clients.missing(clients.CONCURRENT)]
    per_threads = len(keys) * (plan.concurrency_rounds + 1)
    progress = Progress(f"{plan.title} {scheme} threads", per_threads * len(plan.threads))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        for threads in plan.threads:
            rows = {k: _row(clients.CONCURRENT[k].label, "calls/s") for k in keys}
            results[str(threads)] = rows
            batch = max(plan.batch, threads * 4)
            made: dict[str, clients.Batch] = {}
            try:
                for key in keys:
                    row = rows[key]
                    progress.step(f"{threads} threads, warm-up: {row['label']}")
                    try:
                        made[key] = b = clients.CONCURRENT[key].make(endpoint, threads)
                        _, values = meter(row, b.run, max(batch // 4, threads * 2))
                        _check(values)
                        row["total_calls"] += len(values)
                    except Exception as exc:
                        _fail(row, exc)
                        if key in made:
                            made.pop(key).close()
                for number in range(1, plan.concurrency_rounds + 1):
                    for key, b in list(made.items()):
                        row = rows[key]
                        progress.step(
                            f"{threads} threads, round {number}/{plan.concurrency_rounds}: "
                            f"{row['label']}"
                        )
                        try:
                            elapsed, _ = meter(row, b.run, batch)
                        except Exception as exc:
                            _fail(row, exc)
                            made.pop(key).close()
                            continue
                        row["samples"].append(batch / elapsed)
                        row["calls"] = batch
                        row["total_calls"] += batch
            finally:
                for b in made.values():
                    b.close()
            for row in rows.values():
                if row["samples"]:
                    row["median"] = statistics.median(row["samples"])
    finally:
        progress.close()
    return results


def capacity(plan: Plan, scheme: str, seconds: float = 0.3) -> dict[str, float]:
    """The server's requests/s at each concurrency of the plan, from the raw-socket load probe."""
    endpoint = clients.Endpoint(plan.urls[scheme], plan.ca)
    return {str(n): clients.load(endpoint, n, seconds) for n in sorted({1, *plan.threads})}


def run_matrix(plan: Plan) -> dict[str, Any]:
    """Everything ``plan`` asks for, as JSON-ready data."""
    discards = DiscardCounter()
    discards.install()
    stats = Stats(plan.urls["http"], plan.stats_kind)
    meter = Meter(stats, discards)
    out: dict[str, Any] = {
        "plugins": clients.plugins_on(),
        "missing": clients.missing(clients.SEQUENTIAL) | clients.missing(clients.CONCURRENT),
        "capacity": {},
        "sequential": {},
        "concurrency": {},
    }
    try:
        for scheme in plan.schemes:
            if scheme not in plan.urls:
                continue
            if plan.capacity:
                out["capacity"][scheme] = capacity(plan, scheme)
            out["sequential"][scheme] = sequential(plan, scheme, meter)
        for scheme in plan.concurrency_schemes:
            if plan.threads and plan.concurrency and scheme in plan.urls:
                out["concurrency"][scheme] = concurrency(plan, scheme, meter)
    finally:
        stats.close()
    return out
