"""Calls per second through Celery: dispatchkit's task beside a no-op Celery task, same workers.

``python -m benchmarks.celery_throughput [--calls N] [--rounds R] [--redis URL] [--check]``

Same target server (``benchmarks/target.py``, its own process), same run,
rounds alternating the configurations; every figure is the median of the
rounds, and every target a ratio of two medians of this run:

* the thread executor (``pool_maxsize`` 4), the local baseline;
* for 1, 2 and 4 prefork worker processes (one worker per count and round,
  ``celery -A benchmarks.celery_app``: the plugin's worker app plus two no-op
  tasks, so every row of a count runs in the same worker), in an order that
  turns from round to round:

  - a **no-op task, result stored**: ``send_task`` then ``get()`` of every
    result, the delivery settings of dispatchkit's own (JSON, acks late,
    prefetch 1, Redis broker and backend): Celery's ceiling on this machine.
    Its results are waited for as dispatchkit's are (``CeleryResult.get``,
    which polls the backend), so that the rows differ only in the task;
  - a **no-op task, ``ignore_result``**: nothing stored; each counts itself in
    Redis, and the last one signals the caller;
  - a **hand-written task making the same HTTP call** (urllib3 + orjson, its
    result stored), waited for the same way: what the call costs on Celery
    without dispatchkit (no ledger, no retry schedule, no guard);
  - **dispatchkit**: ``Dispatcher(executor="celery").submit()`` then ``get()``
    of every result, with the default durable retry schedule (the ledger);

* **head-of-line**, with 2 worker processes: the dispatchkit row alone, and
  beside 200 calls waiting in backoff (a dead receiver, connection refused,
  next attempt minutes away); each round measures HOL_PAIRS pairs, back to back,
  the order turning.

``--calls`` submits per row, then all are waited for. Targets (PASS/FAIL;
``--check`` exits 1 when one FAILs): dispatchkit >= 0.85 x the no-op task with
results, at each worker count; healthy calls beside the waiting ones >= 0.90 x
alone; a batched fan-out (10,000 calls through ``submit_many``, 2 worker
processes) >= 3 x the no-op task with results.

Needs the ``dispatchkit-celery`` plugin and a reachable Redis (it says so and
exits 2 without them); the Redis database given is emptied before and after.
Writes ``benchmarks/results/celery.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.checks import Check, ratio
from benchmarks.report import checks_table
from benchmarks.servers import ROOT, target
from dispatchkit import Dispatcher

if TYPE_CHECKING:
    import redis
    from celery import Celery
    from dispatchkit_celery._ledger import Ledger

RESULTS = Path(__file__).resolve().parent / "results"
WORKER_COUNTS = (1, 2, 4)
PLUGINS_OFF = ["example", "signing"]
WORKER_APP = "benchmarks.celery_app"
#: Seconds any one wait for the workers may take before the run gives up.
PATIENCE = 300.0

#: dispatchkit's calls/s >= this x the no-op task's (result stored), at every worker count.
NOOP_TARGET = 0.85
#: Head-of-line: healthy calls/s beside HOL_WAITING waiting calls >= this x alone.
HOL_TARGET = 0.90
HOL_PROCESSES = 2
#: Alone/beside pairs per round: a rate moves by 10-20 % between two measurements on
#: a shared machine, so a 10 % target needs more than one pair a round.
HOL_PAIRS = 2
HOL_WAITING = 200
#: Seconds the waiting calls wait: far longer than a measurement (they are removed after it).
HOL_WAIT = 600.0
#: Batched fan-out: FANOUT_CALLS calls through ``submit_many`` >= this x the no-op
#: task's calls/s (result stored), with FANOUT_PROCESSES worker processes.
FANOUT_TARGET = 3.0
FANOUT_CALLS = 10_000
FANOUT_PROCESSES = 2

#: The rows measured in each worker, in the order of round 1 (later rounds turn it).
VARIANTS = ("noop", "noop_ignored", "http_task", "dispatchkit")
LABELS = {
    "threads": "threads (pool 4), local",
    "noop": "no-op task, result stored",
    "noop_ignored": "no-op task, ignore_result",
    "http_task": "hand-written task: urllib3 GET",
    "dispatchkit": "dispatchkit submit + get",
}


def unmet_prerequisite(redis_url: str) -> str | None:
    """Why a Celery benchmark cannot run against ``redis_url``; ``None`` when it can."""
    try:
        from dispatchkit_celery.testing import redis_reachable
    except ImportError:
        return "dispatchkit-celery is not installed: pip install ./plugins/dispatchkit-celery"
    if not redis_reachable(redis_url):
        return f"Redis is not reachable at {redis_url}"
    return None


def row(variant: str, processes: int) -> str:
    """The results key of ``variant`` with ``processes`` worker processes."""
    return f"{variant}/{processes}"


def _processes(n: int) -> str:
    return f"{n} worker process{'es' if n > 1 else ''}"


def _until(condition: Callable[[], bool], what: str, timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def _rate(d: Dispatcher, url: str, calls: int) -> float:
    started = time.perf_counter()
    results = [d.submit(url, x=i, y=2) for i in range(calls)]
    values = [r.get(timeout=PATIENCE) for r in results]
    elapsed = time.perf_counter() - started
    if values != [100] * calls:  # the target answers one fixed envelope
        raise SystemExit(f"wrong results: {values[:3]}...")
    return calls / elapsed


def _dead_url() -> str:
    """A loopback port nobody listens on: every attempt is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


class Bench:
    """One worker (``processes`` processes) and the callers that measure it."""

    def __init__(
        self, redis_url: str, queue: str, url: str, caller: Celery, ledger: Ledger
    ) -> None:
        import redis

        self.queue = queue
        self.url = url
        self.caller = caller  # the no-op tasks' caller: make_app(), as the executor makes it
        self.ledger = ledger
        self.client: redis.Redis = redis.Redis.from_url(redis_url)
        common: dict[str, Any] = {
            "executor": "celery",
            "celery_broker": redis_url,
            "celery_queue": queue,
            "celery_get_timeout": PATIENCE,
            "disable": PLUGINS_OFF,
        }
        self.dispatcher = Dispatcher(**common)
        # Another caller on the same workers: its calls fail and wait for HOL_WAIT seconds.
        self.waiting = Dispatcher(**common, retry_schedule=[HOL_WAIT], retry_jitter=0)
        self.dead_url = _dead_url()

    def close(self) -> None:
        self.dispatcher.close()
        self.waiting.close()
        self.client.close()

    def rate(self, variant: str, calls: int) -> float:
        from benchmarks.celery_app import HTTP_CALL, NOOP

        if variant == "dispatchkit":
            return _rate(self.dispatcher, self.url, calls)
        if variant == "noop":
            return self.task(calls, NOOP)
        if variant == "http_task":
            return self.task(calls, HTTP_CALL, self.url)
        return self.noop_ignored(calls)

    def task(self, calls: int, name: str, *first: Any) -> float:
        """Calls/s of the benchmark's task ``name`` (``first`` + ``[i, 2]`` its arguments),
        its results waited for by the code that waits for dispatchkit's
        (``CeleryResult.get``): the rows differ in the task, not the caller."""
        from dispatchkit_celery._executor import CeleryResult

        started = time.perf_counter()
        results = [
            CeleryResult(
                self.caller.send_task(name, args=[*first, i, 2], queue=self.queue), PATIENCE
            )
            for i in range(calls)
        ]
        values = [r.get() for r in results]
        elapsed = time.perf_counter() - started
        if values != [100] * calls:
            raise SystemExit(f"wrong results of {name}: {values[:3]}...")
        return calls / elapsed

    def noop_ignored(self, calls: int) -> float:
        from benchmarks.celery_app import NOOP_COUNTED

        key = f"bench:noop:{uuid.uuid4().hex}"
        started = time.perf_counter()
        for _ in range(calls):
            self.caller.send_task(
                NOOP_COUNTED, args=[key, calls], queue=self.queue, ignore_result=True
            )
        done = self.client.blpop([f"{key}:done"], timeout=PATIENCE)
        elapsed = time.perf_counter() - started
        if done is None or int(self.client.get(key) or 0) != calls:
            raise SystemExit(f"the no-op tasks did not all run within {PATIENCE:g}s")
        self.client.delete(key, f"{key}:done")
        return calls / elapsed

    def beside_waiting(self, calls: int) -> float:
        """The dispatchkit row while HOL_WAITING calls wait in the ledger; removed after."""
        ids = [self.waiting.submit(self.dead_url).id for _ in range(HOL_WAITING)]
        _until(lambda: self._waiting(ids) == len(ids), f"{len(ids)} calls to wait in the ledger")
        try:
            rate = _rate(self.dispatcher, self.url, calls)
            if self._waiting(ids) != len(ids):  # then it measured something else
                raise SystemExit("the waiting calls left the ledger during the measurement")
            return rate
        finally:
            for task_id in ids:
                self.ledger.forget(task_id)

    def _waiting(self, ids: list[str]) -> int:
        with self.ledger.client.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hget(self.ledger.call_key(task_id), "state")
            found = pipe.execute()
        return sum(state == b"waiting" for state in found)


@contextlib.contextmanager
def _bench(redis_url: str, processes: int, url: str) -> Iterator[Bench]:
    from dispatchkit_celery._app import make_app
    from dispatchkit_celery._ledger import Ledger
    from dispatchkit_celery.testing import celery_worker

    queue = f"dispatchkit-bench-{uuid.uuid4().hex[:8]}"
    settings: dict[str, object] = {"timeout": 10, "disable": PLUGINS_OFF}
    caller = make_app(redis_url)
    ledger = Ledger(redis_url)
    try:
        with celery_worker(
            queue, concurrency=processes, url=redis_url, worker_settings=settings, app=WORKER_APP
        ):
            bench = Bench(redis_url, queue, url, caller, ledger)
            try:
                yield bench
            finally:
                bench.close()
    finally:
        ledger.close()
        caller.close()


def fanout_rate(bench: Bench, calls: int = FANOUT_CALLS) -> float:
    """Calls/s of a batched fan-out: ``calls`` calls through ``submit_many``, all waited for.

    One ``submit_many`` of every call to ``bench.url`` (chunks of ``celery_batch_size``,
    100 by default, one message each), then ``get()`` of every result, as
    :func:`_rate` does for single calls; calls / elapsed.
    """
    started = time.perf_counter()
    results = bench.dispatcher.submit_many(bench.url, [{"x": i, "y": 2} for i in range(calls)])
    values = [r.get(timeout=PATIENCE) for r in results]
    elapsed = time.perf_counter() - started
    if values != [100] * calls:  # the target answers one fixed envelope
        raise SystemExit(f"wrong fan-out results: {values[:3]}...")
    return calls / elapsed


def evaluate(results: dict[str, Any]) -> list[Check]:
    """The targets, from a run's results: ratios of medians of the same run."""
    medians: dict[str, float] = results.get("medians") or {}
    checks = [
        Check(
            f"celery, {_processes(n)}: dispatchkit submit + get >= {NOOP_TARGET:.2f} x "
            "a no-op task's calls/s (result stored)",
            ratio(medians.get(row("dispatchkit", n)), medians.get(row("noop", n))),
            ">=",
            NOOP_TARGET,
        )
        for n in WORKER_COUNTS
    ]
    checks += [
        Check(
            f"celery, {_processes(n)}: dispatchkit submit + get >= {NOOP_TARGET:.2f} x "
            "a hand-written task making the same HTTP call (reported)",
            ratio(medians.get(row("dispatchkit", n)), medians.get(row("http_task", n))),
            ">=",
            NOOP_TARGET,
            stretch=True,
        )
        for n in WORKER_COUNTS
    ]
    hol = results.get("hol") or {}
    checks.append(
        Check(
            f"celery, {_processes(HOL_PROCESSES)}: calls beside {HOL_WAITING} waiting in "
            f"backoff >= {HOL_TARGET:.2f} x their calls/s alone",
            ratio(hol.get("median_beside"), hol.get("median_alone")),
            ">=",
            HOL_TARGET,
        )
    )
    fanout = results.get("fanout") or {}
    checks.append(
        Check(
            f"celery, {_processes(FANOUT_PROCESSES)}: batched fan-out, {FANOUT_CALLS:,} calls "
            f"through submit_many >= {FANOUT_TARGET:g} x a no-op task's calls/s (result stored)",
            ratio(fanout.get("median"), medians.get(row("noop", FANOUT_PROCESSES))),
            ">=",
            FANOUT_TARGET,
        )
    )
    return checks


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measure(redis_url: str, calls: int, rounds: int) -> dict[str, Any]:
    """Every row, ``rounds`` alternating rounds; the raw rates and their medians."""
    rates: dict[str, list[float]] = {"threads": []}
    for n in WORKER_COUNTS:
        rates.update({row(variant, n): [] for variant in VARIANTS})
    hol: dict[str, Any] = {"processes": HOL_PROCESSES, "waiting": HOL_WAITING, "calls": calls,
                           "pairs_per_round": HOL_PAIRS, "alone": [], "beside": []}  # fmt: skip
    fanout: dict[str, Any] = {"processes": FANOUT_PROCESSES, "calls": FANOUT_CALLS, "rates": []}
    with target("127.0.0.1", None) as running:
        url = running.urls["http"] + "/multiply"
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            with Dispatcher(pool_maxsize=4, disable=PLUGINS_OFF) as local:
                _rate(local, url, 50)  # warm-up: connections
                rates["threads"].append(_rate(local, url, calls))
            for n in WORKER_COUNTS:
                with _bench(redis_url, n, url) as bench:
                    for variant in VARIANTS:  # warm-up: each process's imports, pools, clients
                        bench.rate(variant, 20)
                    turn = (r + n) % len(VARIANTS)
                    for variant in VARIANTS[turn:] + VARIANTS[:turn]:
                        rates[row(variant, n)].append(bench.rate(variant, calls))
                    for pair in range(HOL_PAIRS if n == HOL_PROCESSES else 0):
                        first = (r + pair) % 2 == 0
                        for name in ("alone", "beside") if first else ("beside", "alone"):
                            hol[name].append(
                                bench.beside_waiting(calls)
                                if name == "beside"
                                else bench.rate("dispatchkit", calls)
                            )
                    if n == FANOUT_PROCESSES:
                        fanout_rate(bench, 200)  # warm-up: the chunk task in each process
                        fanout["rates"].append(fanout_rate(bench))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    hol["median_alone"] = _median(hol["alone"])
    hol["median_beside"] = _median(hol["beside"])
    # Each pair was measured back to back: their ratios show the noise.
    hol["round_ratios"] = [b / a for a, b in zip(hol["alone"], hol["beside"], strict=True)]
    fanout["median"] = _median(fanout["rates"])
    return {"calls": calls, "rounds": rounds, "rates": rates, "medians": medians, "hol": hol,
            "fanout": fanout}  # fmt: skip


def _line(label: str, rate: float, threads: float, noop: float | None) -> str:
    vs_noop = f"{rate / noop:>8.2f}x" if noop else f"{'':>9}"
    return f"{label:<34} {rate:>9,.0f} {1000 / rate:>8.2f} {rate / threads:>10.2f}x {vs_noop}"


def text(results: dict[str, Any], found: list[Check]) -> str:
    medians = results["medians"]
    threads = medians["threads"]
    lines = [
        f"{results['calls']:,} calls per row, median of {results['rounds']} alternating rounds",
        f"{'':<34} {'calls/s':>9} {'ms/call':>8} {'vs threads':>11} {'vs no-op':>9}",
        _line(LABELS["threads"], threads, threads, None),
    ]
    for n in WORKER_COUNTS:
        noop = medians[row("noop", n)]
        lines.append(f"celery, {_processes(n)}")
        for variant in VARIANTS:
            lines.append(_line("  " + LABELS[variant], medians[row(variant, n)], threads, noop))
        extra = 1000 / medians[row("dispatchkit", n)] - 1000 / noop
        lines.append(f"  dispatchkit's own cost over the no-op: {extra:.2f} ms/call")
    hol, fanout = results["hol"], results["fanout"]["median"]
    noop = medians[row("noop", HOL_PROCESSES)]
    lines += [
        f"head-of-line, {_processes(HOL_PROCESSES)}: dispatchkit calls alone and beside "
        f"{HOL_WAITING} calls waiting in backoff (a refused port)",
        _line("  alone", hol["median_alone"], threads, noop),
        _line(f"  beside {HOL_WAITING} waiting", hol["median_beside"], threads, noop),
        "  beside / alone, pair by pair: "
        + ", ".join(f"{value:.2f}x" for value in hol["round_ratios"]),
        f"batched fan-out, {_processes(FANOUT_PROCESSES)}: {FANOUT_CALLS:,} calls "
        "through submit_many, then get() of each",
        *(
            ["  not measured"]
            if fanout is None
            else [
                _line(
                    "  submit_many + get", fanout, threads, medians[row("noop", FANOUT_PROCESSES)]
                )
            ]
        ),
        "",
        checks_table(found),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14",
                        help="a Redis database of the benchmark's own: it is emptied")  # fmt: skip
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target FAILs"
    )
    args = parser.parse_args()
    missing = unmet_prerequisite(args.redis)
    if missing is not None:
        print(missing)
        return 2
    from dispatchkit_celery.testing import flush

    # The worker imports benchmarks.celery_app, wherever this was started from.
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([path] if path else [])])
    flush(args.redis)
    try:
        results = measure(args.redis, args.calls, args.rounds)
    finally:
        flush(args.redis)
    found = evaluate(results)
    results["checks"] = [check.to_dict() for check in found]
    results["date"] = datetime.date.today().isoformat()
    results["command"] = " ".join(["python -m benchmarks.celery_throughput", *sys.argv[1:]])
    print()
    print(text(results, found))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "celery.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    failed = [c for c in found if c.status == "FAIL"]
    if failed and args.check:
        print(f"--check: {len(failed)} target(s) missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
