"""What the endpoint guard in Redis costs per call, and what it saves beside a dead receiver.

``python -m benchmarks.guard_cost [--calls N] [--rounds R] [--redis URL] [--celery]``

Two measurements, each as ratios of medians of rounds that alternate the rows
of the same run:

* **cost per call** (always): one thread calling the benchmark's target server
  (``benchmarks/target.py``, its own process) ``--calls`` times in a row
  through a ``Dispatcher`` without a guard, with the in-process guard
  (``circuit_breaker=True``), with the shared guard in Redis
  (``endpoints_redis``, the breaker), and with the shared guard doing all it
  can (the breaker, a rate limit and a cap); and, for scale, one Redis
  ``PING`` per call. Each guarded call makes two Lua scripts on Redis (admit
  and report): the difference to the unguarded row is their cost.
* **healthy throughput beside a dead receiver** (``--celery``): one Celery
  worker with 4 processes, 300 calls to the target interleaved 1:1 with 300
  calls to a second receiver, timed until every call to the target is done.
  The second receiver is the target too (the baseline: the same number of
  messages, all healthy), or a receiver that reads each request and never
  answers (every attempt holds a worker process until its 0.25 s timeout),
  with the worker's breaker on (the Celery default: after 5 failures the
  rest are deferred through the ledger) or off. Target: the healthy calls
  keep >= 0.80 x the baseline's rate with the breaker on.

Needs a reachable Redis (and, for ``--celery``, the ``dispatchkit-celery``
plugin); says so and exits 2 without them. The database given is emptied
before and after. Nothing is written unless ``--json FILE`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.celery_throughput import unmet_prerequisite
from benchmarks.checks import Check, ratio
from benchmarks.report import checks_table
from benchmarks.servers import target
from dispatchkit import Dispatcher

PLUGINS_OFF = ["example", "signing"]
#: The healthy calls beside a dead receiver keep at least this x the baseline's rate.
BESIDE_DEAD_TARGET = 0.80
PROCESSES = 4
#: Calls per kind in the --celery rows (healthy, and as many to the other receiver).
CELERY_CALLS = 300
#: Seconds an attempt to the hanging receiver holds a worker process.
HANG_TIMEOUT = 0.25
PATIENCE = 300.0

COST_ROWS = {
    "none": "no guard",
    "memory": "in-process guard (circuit_breaker)",
    "redis": "Redis guard (circuit_breaker)",
    "redis_all": "Redis guard (breaker, rate limit, cap)",
    "ping": "one Redis PING, for scale",
}
CELERY_ROWS = {
    "baseline": "beside as many healthy calls",
    "breaker_on": "beside a hanging receiver, breaker on",
    "breaker_off": "beside a hanging receiver, breaker off",
}


# -- cost per call ------------------------------------------------------------------------


def _settings(row: str, redis_url: str) -> dict[str, Any]:
    if row == "memory":
        return {"circuit_breaker": True}
    if row == "redis":
        return {"endpoints_redis": redis_url, "circuit_breaker": True}
    return {"endpoints_redis": redis_url, "circuit_breaker": True,
            "rate_limits": {"*": "1000000/s"}, "origin_concurrency": 64}  # fmt: skip


def _per_call(call: Callable[[], Any], calls: int) -> float:
    """Microseconds per call of ``calls`` calls in a row."""
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def _caller(d: Dispatcher, url: str) -> Callable[[], Any]:
    return lambda: d.call(url)


def measure_cost(redis_url: str, calls: int, rounds: int) -> dict[str, list[float]]:
    import redis

    us: dict[str, list[float]] = {row: [] for row in COST_ROWS}
    client = redis.Redis.from_url(redis_url)
    try:
        with target("127.0.0.1", None) as running:
            url = running.urls["http"] + "/hook"
            for r in range(rounds):
                print(f"cost: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
                rows = list(COST_ROWS)
                turn = r % len(rows)
                for row in rows[turn:] + rows[:turn]:
                    if row == "ping":
                        client.ping()
                        us[row].append(_per_call(client.ping, calls))
                        continue
                    extra = {} if row == "none" else _settings(row, redis_url)
                    with Dispatcher(pool_maxsize=1, disable=PLUGINS_OFF, **extra) as d:
                        one = _caller(d, url)
                        _per_call(one, 50)  # warm-up: the connection, the scripts
                        us[row].append(_per_call(one, calls))
    finally:
        client.close()
    return us


# -- beside a dead receiver, on Celery ---------------------------------------------------------


class Hanging:
    """Accepts, reads, never answers; closes each connection when the client does."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Hanging:
        self._accept.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.listener.close()
        self._accept.join(5)
        for thread in self._threads:
            thread.join(5)

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._hold, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.1)
            while not self._stop.is_set():
                try:
                    if not conn.recv(65536):
                        return
                except TimeoutError:
                    continue
                except OSError:
                    return


@contextlib.contextmanager
def _worker(redis_url: str, queue: str, breaker: bool) -> Iterator[None]:
    from dispatchkit_celery.testing import celery_worker

    settings = {"timeout": HANG_TIMEOUT, "deadline": 2 * HANG_TIMEOUT, "visibility_timeout": 5,
                "delivery_poll_interval": 0.2, "disable": PLUGINS_OFF}  # fmt: skip
    if not breaker:
        settings["circuit_breaker"] = False
    with celery_worker(queue, PROCESSES, url=redis_url, worker_settings=settings):
        yield


def _healthy_rate(d: Dispatcher, healthy: str, other: str, calls: int) -> float:
    """Healthy calls/s, ``calls`` of them interleaved 1:1 with as many to ``other``."""
    started = time.perf_counter()
    results = []
    for _ in range(calls):
        results.append(d.submit(healthy))
        d.submit(other)
    values = [r.get(timeout=PATIENCE) for r in results]
    elapsed = time.perf_counter() - started
    if values != [100] * calls:  # the target answers one fixed envelope
        raise SystemExit(f"wrong results: {values[:3]}...")
    return calls / elapsed


def measure_celery(redis_url: str, calls: int, rounds: int) -> dict[str, list[float]]:
    from dispatchkit_celery.testing import flush

    rates: dict[str, list[float]] = {row: [] for row in CELERY_ROWS}
    with target("127.0.0.1", None) as running, Hanging() as hanging:
        healthy = running.urls["http"] + "/hook"
        for r in range(rounds):
            print(f"celery: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for breaker in order:
                queue = f"guard-cost-{uuid.uuid4().hex[:8]}"
                flush(redis_url)  # no breaker, bucket or waiting call from the last row
                caller = {"executor": "celery", "celery_broker": redis_url,
                          "celery_queue": queue, "retry_schedule": [600]}  # fmt: skip
                with (
                    _worker(redis_url, queue, breaker == "on"),
                    Dispatcher(disable=PLUGINS_OFF, **caller) as d,
                ):
                    _healthy_rate(d, healthy, healthy, 20)  # warm-up: every pool process
                    if breaker == "on":
                        rates["baseline"].append(_healthy_rate(d, healthy, healthy, calls))
                        rates["breaker_on"].append(_healthy_rate(d, healthy, hanging.url, calls))
                    else:
                        rates["breaker_off"].append(_healthy_rate(d, healthy, hanging.url, calls))
    return rates


# -- the report -----------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def text(results: dict[str, Any]) -> str:
    cost = {row: _median(values) for row, values in results["cost"].items()}
    none = cost["none"]
    lines = [
        f"cost per call: {results['calls']:,} calls in a row per row, median of "
        f"{results['rounds']} alternating rounds",
        f"{'':<42} {'us/call':>8} {'vs none':>8} {'added us':>9}",
    ]
    for row, label in COST_ROWS.items():
        value = cost[row]
        assert value is not None
        assert none is not None
        added = "" if row in ("none", "ping") else f"{value - none:>9.0f}"
        lines.append(f"{label:<42} {value:>8.0f} {value / none:>7.2f}x {added}")
    celery = results.get("celery")
    if celery:
        medians = {row: _median(values) for row, values in celery.items()}
        base = medians["baseline"]
        lines += [
            "",
            f"healthy calls on Celery ({PROCESSES} worker processes), {CELERY_CALLS} healthy "
            f"interleaved 1:1 with {CELERY_CALLS} others, median of {results['rounds']} rounds",
            f"{'':<42} {'calls/s':>8} {'vs base':>8}",
        ]
        for row, label in CELERY_ROWS.items():
            value = medians[row]
            assert value is not None
            assert base is not None
            lines.append(f"{label:<42} {value:>8.0f} {value / base:>7.2f}x")
        lines += ["", checks_table(checks(results))]
    return "\n".join(lines)


def checks(results: dict[str, Any]) -> list[Check]:
    celery = results.get("celery") or {}
    on = _median(celery.get("breaker_on", []))
    base = _median(celery.get("baseline", []))
    return [
        Check(
            "healthy calls beside a hanging receiver, breaker on >= 0.80 x beside healthy ones",
            ratio(on, base),
            ">=",
            BESIDE_DEAD_TARGET,
        )
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per cost row and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15",
                        help="a Redis database of the benchmark's own: it is emptied")  # fmt: skip
    parser.add_argument(
        "--celery", action="store_true", help="also measure calls beside a dead receiver"
    )
    parser.add_argument("--json", metavar="FILE", help="write the raw figures to FILE")
    args = parser.parse_args()
    missing = unmet_prerequisite(args.redis)
    if missing is not None:
        print(missing)
        return 2
    from dispatchkit_celery.testing import flush

    flush(args.redis)
    try:
        results: dict[str, Any] = {"calls": args.calls, "rounds": args.rounds}
        results["cost"] = measure_cost(args.redis, args.calls, args.rounds)
        if args.celery:
            results["celery"] = measure_celery(args.redis, CELERY_CALLS, args.rounds)
    finally:
        flush(args.redis)
    print()
    print(text(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
