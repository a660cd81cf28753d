"""First look: the cost of ``Dispatcher.call`` vs bare urllib3 + orjson, same server, same run.

``python benchmarks/overhead.py [--calls N] [--rounds R]`` starts ``target.py``
in its own process, then alternates rounds of each client (so that drift on a
shared machine hits both alike) and prints the median microseconds per call.
It runs with every installed plugin. The full comparison against every peer,
with the entry-point plugins off, is ``python -m benchmarks`` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import urllib3

from dispatchkit import Dispatcher


def start_target() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("target.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("LISTENING "):
        proc.kill()
        raise SystemExit(f"target server did not start: {line!r}")
    return proc, line.split()[1]


def per_call(fn: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    proc, base = start_target()
    url = f"{base}/multiply"
    pool = urllib3.PoolManager()
    try:
        with Dispatcher(timeout=5) as d:
            clients: dict[str, Callable[[], object]] = {
                "urllib3 PoolManager.request + orjson.loads": lambda: orjson.loads(
                    pool.request("GET", url + "?x=10&y=10").data
                ),
                "dispatchkit Dispatcher.call": lambda: d.call(url, "GET", x=10, y=10),
            }
            for fn in clients.values():  # warm up: connections, caches
                per_call(fn, 200)
            samples: dict[str, list[float]] = {name: [] for name in clients}
            for _ in range(args.rounds):
                for name, fn in clients.items():
                    samples[name].append(per_call(fn, args.calls))
        base_name = next(iter(clients))
        base_median = statistics.median(samples[base_name])
        plugins = ", ".join(info.name for info in Dispatcher().plugins)
        print(f"{args.rounds} rounds x {args.calls} sequential GET calls; plugins: {plugins}")
        for name, values in samples.items():
            median = statistics.median(values)
            print(f"  {name:<45} {median:7.1f} us/call  x{median / base_median:.3f}")
    finally:
        pool.clear()
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
