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
Every sample starts with a full collection (not timed): what the garbage
collector does in a sample is then what that sample's client allocated, not
a full collection owed by the clients measured before it.

The concurrency sweeps run every concurrent client with N calls in flight
(N threads, or N tasks on one event loop for the asyncio clients, and a pool
of N connections either way), against the fast endpoint and against one that
answers ``delay_ms`` late. A sample is ``batch`` calls, more for a client so
fast that they would take less than ``sample_min_s``, fewer for one so slow
that they would take longer than ``sample_max_s`` (never fewer than N);
a client stops its rounds at a level once it has spent ``level_budget_s``
there, and an asyncio sample is cancelled after ``sample_limit_s``: a client
that collapses is reported as it is, and not run at higher levels.

``run_matrix(plan)`` runs in this process for loopback, and in a child
process inside the client's network namespace for the RTT runs
(``python -m benchmarks.worker`` reads the plan on stdin, prints JSON).
"""

from __future__ import annotations

import gc
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
    #: Calls in flight against the fast endpoint: the threaded clients', the asyncio ones'.
    threads: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    async_levels: list[int] = field(default_factory=list)
    concurrency_rounds: int = 7
    batch: int = 1000
    #: Calls in flight against the endpoint that answers ``delay_ms`` late (every client).
    delayed: list[int] = field(default_factory=list)
    delay_ms: int = clients.DELAY_MS
    delayed_rounds: int = 5
    delayed_waves: int = 8  # a sample there is this many times N calls, up to max_batch
    max_batch: int = 4096
    sample_max_s: float = 2.5
    #: A fast client's sample has more than ``batch`` calls, to last at least this long
    #: (a sample of a tenth of a second measures the machine's noise as much as the client).
    sample_min_s: float = 0.0
    max_sample_calls: int = 20_000
    level_budget_s: float = 15.0
    sample_limit_s: float = 20.0
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
        gc.collect()  # every sample starts with nothing left to collect from the one before
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


def levels(plan: Plan, key: str, delayed: bool) -> list[int]:
    """The calls in flight ``key`` runs with, against the fast or the delayed endpoint."""
    if delayed:
        wanted = plan.delayed
    else:
        wanted = plan.async_levels if key in clients.ASYNCIO else plan.threads
    most = clients.CONCURRENT[key].max_level
    return [n for n in wanted if most is None or n <= most]


def batch_size(plan: Plan, level: int, delayed: bool) -> int:
    """Calls per sample at ``level`` in flight: enough for several waves of N."""
    if delayed:
        return max(2 * level, min(plan.delayed_waves * level, plan.max_batch))
    return max(plan.batch, min(4 * level, plan.max_batch))


def sample_calls(plan: Plan, batch: int, level: int, rate: float) -> int:
    """Calls per sample of a client that warmed up at ``rate`` calls/s.

    ``batch``, but more for a client so fast that the sample would end before
    ``sample_min_s``, and fewer (at least ``level``) for one so slow that it
    would last more than ``sample_max_s``.
    """
    if batch > rate * plan.sample_max_s:
        return min(batch, max(level, round(rate * plan.sample_max_s)))
    if batch < rate * plan.sample_min_s:
        return min(plan.max_sample_calls, round(rate * plan.sample_min_s))
    return batch


def concurrency(
    plan: Plan, scheme: str, meter: Meter, delayed: bool = False
) -> dict[str, dict[str, dict[str, Any]]]:
    """Calls per second (and CPU per call) of every concurrent client at each level in flight."""
    path = clients.delayed(plan.delay_ms) if delayed else clients.TASK
    endpoint = clients.Endpoint(plan.urls[scheme], plan.ca, path)
    keys = [k for k in plan.concurrency if k not in clients.missing(clients.CONCURRENT)]
    runs = {k: levels(plan, k, delayed) for k in keys}
    rounds = plan.delayed_rounds if delayed else plan.concurrency_rounds
    where = f"{plan.delay_ms} ms endpoint" if delayed else "in flight"
    progress = Progress(
        f"{plan.title} {scheme} {where}", sum(map(len, runs.values())) * (rounds + 1)
    )
    results: dict[str, dict[str, dict[str, Any]]] = {}
    collapsed: dict[str, str] = {}  # key -> why it is not run at higher levels
    try:
        for level in sorted({n for found in runs.values() for n in found}):
            here = [k for k in keys if level in runs[k]]
            rows = {k: _row(clients.CONCURRENT[k].label, "calls/s") for k in here}
            results[str(level)] = rows
            batch = batch_size(plan, level, delayed)
            made: dict[str, clients.Batch] = {}
            spent: dict[str, float] = {}
            try:
                for key in here:
                    row = rows[key]
                    progress.step(f"{level} in flight, warm-up: {row['label']}")
                    if key in collapsed:
                        row["error"] = collapsed[key]
                        continue
                    try:
                        made[key] = b = _make(plan, key, endpoint, level)
                        warm = max(batch // 4, level)
                        elapsed, values = meter(row, b.run, warm)
                        _check(values)
                    except Exception as exc:
                        _fail(row, exc)
                        if isinstance(exc, clients.BatchTimeout):
                            collapsed[key] = f"not run: timed out at {level} in flight"
                        if key in made:
                            made.pop(key).close()
                        continue
                    spent[key] = elapsed
                    row["total_calls"] += len(values)
                    # A client too slow for the batch in sample_max_s does fewer calls (>= N).
                    rate = len(values) / elapsed if elapsed > 0 else float("inf")
                    row["calls"] = sample_calls(plan, batch, level, rate)
                for number in range(1, rounds + 1):
                    for key, b in list(made.items()):
                        row = rows[key]
                        progress.step(f"{level} in flight, round {number}/{rounds}: {row['label']}")
                        if row["samples"] and spent[key] > plan.level_budget_s:
                            continue  # a slow client: the rounds it had must do
                        n = row["calls"]
                        try:
                            elapsed, _ = meter(row, b.run, n)
                        except Exception as exc:
                            _fail(row, exc)
                            if isinstance(exc, clients.BatchTimeout):
                                collapsed[key] = f"not run: timed out at {level} in flight"
                            made.pop(key).close()
                            continue
                        spent[key] += elapsed
                        row["samples"].append(n / elapsed)
                        row["cpu_samples"].append(meter.cpu / n * 1e6)
                        row["total_calls"] += n
            finally:
                for b in made.values():
                    b.close()
            for row in rows.values():
                row["batch"] = batch
                if row["samples"]:
                    row["median"] = statistics.median(row["samples"])
                    row["cpu_median"] = statistics.median(row["cpu_samples"])
    finally:
        progress.close()
    return results


def _make(plan: Plan, key: str, endpoint: clients.Endpoint, level: int) -> clients.Batch:
    spec = clients.CONCURRENT[key]
    if key in clients.ASYNCIO:
        made: clients.Batch = spec.make(endpoint, level, limit=plan.sample_limit_s)
    else:
        made = spec.make(endpoint, level)
    return made


def capacity(plan: Plan, scheme: str, seconds: float = 0.3) -> dict[str, float]:
    """The server's requests/s at each concurrency of the plan, from the raw-socket load probe."""
    endpoint = clients.Endpoint(plan.urls[scheme], plan.ca)
    return {str(n): clients.load(endpoint, n, seconds) for n in sorted({1, *plan.threads})}


def delayed_capacity(plan: Plan, scheme: str, seconds: float = 0.5) -> dict[str, float]:
    """The same probe against the delayed endpoint, at the most calls in flight of the plan.

    The ideal is N / delay: the server must answer that, or the clients' figures
    there would be its own.
    """
    endpoint = clients.Endpoint(plan.urls[scheme], plan.ca, clients.delayed(plan.delay_ms))
    most = max(plan.delayed)
    return {str(most): clients.load(endpoint, most, seconds)}


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
        "delay_ms": plan.delay_ms,
        "delayed_capacity": {},
        "delayed": {},
    }
    try:
        for scheme in plan.schemes:
            if scheme not in plan.urls:
                continue
            if plan.capacity:
                out["capacity"][scheme] = capacity(plan, scheme)
            out["sequential"][scheme] = sequential(plan, scheme, meter)
        for scheme in plan.concurrency_schemes:
            if plan.concurrency and scheme in plan.urls:
                if plan.threads or plan.async_levels:
                    out["concurrency"][scheme] = concurrency(plan, scheme, meter)
                if plan.delayed:
                    if plan.capacity:
                        out["delayed_capacity"][scheme] = delayed_capacity(plan, scheme)
                    out["delayed"][scheme] = concurrency(plan, scheme, meter, delayed=True)
    finally:
        stats.close()
    return out
