"""Calls per second through Celery with 1, 2 and 4 worker processes, against the thread executor.

``python -m benchmarks.celery_throughput [--calls N] [--rounds R] [--redis URL]``

Same target server (``benchmarks/target.py``, its own process), same run: the
local thread executor (``pool_maxsize`` 4), then a prefork Celery worker with
1, 2 and 4 processes on a Redis broker, each fed ``--calls`` submits and then
waited for. Rounds alternate the configurations; the figure is the median.
Needs the ``dispatchkit-celery`` plugin and a reachable Redis (it says so and
exits 2 without them). Writes ``benchmarks/results/celery.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from benchmarks.servers import target
from dispatchkit import Dispatcher

RESULTS = Path(__file__).resolve().parent / "results"
WORKER_COUNTS = (1, 2, 4)
PLUGINS_OFF = ["example", "signing"]


def _rate(d: Dispatcher, url: str, calls: int) -> float:
    started = time.perf_counter()
    results = [d.submit(url, x=i, y=2) for i in range(calls)]
    values = [r.get(timeout=300) for r in results]
    elapsed = time.perf_counter() - started
    if values != [100] * calls:  # the target answers one fixed envelope
        raise SystemExit(f"wrong results: {values[:3]}...")
    return calls / elapsed


@contextlib.contextmanager
def _celery(redis: str, processes: int) -> Iterator[Dispatcher]:
    from dispatchkit_celery.testing import celery_worker

    queue = f"dispatchkit-bench-{uuid.uuid4().hex[:8]}"
    settings: dict[str, object] = {"timeout": 10, "disable": PLUGINS_OFF}
    with (
        celery_worker(queue, concurrency=processes, url=redis, worker_settings=settings),
        Dispatcher(
            executor="celery",
            celery_broker=redis,
            celery_queue=queue,
            celery_get_timeout=300,
            disable=PLUGINS_OFF,
        ) as d,
    ):
        yield d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    try:
        from dispatchkit_celery.testing import flush, redis_reachable
    except ImportError:
        print("dispatchkit-celery is not installed: pip install ./plugins/dispatchkit-celery")
        return 2
    if not redis_reachable(args.redis):
        print(f"Redis is not reachable at {args.redis}")
        return 2
    flush(args.redis)
    rates: dict[str, list[float]] = {"threads (pool 4)": []}
    rates.update({f"celery, {n} worker process{'es' if n > 1 else ''}": [] for n in WORKER_COUNTS})
    try:
        with target("127.0.0.1", None) as running:
            url = running.urls["http"] + "/multiply"
            for round_ in range(1, args.rounds + 1):
                print(f"round {round_}/{args.rounds}", file=sys.stderr, flush=True)
                with Dispatcher(pool_maxsize=4, disable=PLUGINS_OFF) as local:
                    _rate(local, url, 50)  # warm-up: connections
                    rates["threads (pool 4)"].append(_rate(local, url, args.calls))
                for n in WORKER_COUNTS:
                    with _celery(args.redis, n) as d:
                        _rate(d, url, 20)  # warm-up: each process's Dispatcher and pool
                        key = f"celery, {n} worker process{'es' if n > 1 else ''}"
                        rates[key].append(_rate(d, url, args.calls))
    finally:
        flush(args.redis)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    base = medians["threads (pool 4)"]
    print(f"\n{args.calls} calls per configuration, median of {args.rounds} rounds")
    print(f"{'executor':<32} {'calls/s':>9} {'vs threads':>11} {'ms/call':>8}")
    for name, rate in medians.items():
        print(f"{name:<32} {rate:>9,.0f} {rate / base:>10.2f}x {1000 / rate:>8.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "celery.json"
    out.write_text(json.dumps({"calls": args.calls, "rates": rates, "medians": medians}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
