"""Side by side in one process: asyncio clients in alternating rounds, paired ratios.

::

    python -m benchmarks.compare_async [--clients aiohttp dk_async] [--in-flight 16 64]
                                       [--rounds 40] [--calls 1000] [--delay-ms 0] [--no-gc]

Starts the suite's target server, makes every client of
:data:`benchmarks.clients.CONCURRENT` named (the suite's own code) at each
level in flight, warms them up, then runs ``--rounds`` rounds of ``--calls``
calls, the clients taking turns (in reverse order every other round). It
prints each client's median CPU time per call and calls/s, and their ratios to
the first client, both as a ratio of medians and as the median of the
per-round ratios (paired: a round's neighbours ran under the same load).

For a change of a few percent, this is steadier than the suite's own few
rounds, and than comparing two processes: the clients share one process, so
they share its allocator's state (glibc serves the socket reads' 256 KiB
buffers with ``mmap`` until a large free raises its threshold, which one
process may reach and another not) and the load of the moment. ``--no-gc``
collects before each round and keeps the collector off during it, to take
its share (which depends on what else lives in the process) out of a
comparison of code paths.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Sequence

from benchmarks import clients, servers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_async", description=__doc__.partition("\n")[0]
    )
    parser.add_argument(
        "--clients", nargs="+", default=["aiohttp", "dk_async"], choices=clients.ASYNCIO
    )
    parser.add_argument("--in-flight", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=1000, help="per round and client")
    parser.add_argument("--delay-ms", type=int, default=0, help="0: the fast endpoint")
    parser.add_argument("--no-gc", action="store_true", help="the collector off in rounds")
    args = parser.parse_args(argv)  # fmt: skip
    path = clients.delayed(args.delay_ms) if args.delay_ms else clients.TASK
    first = args.clients[0]
    with servers.target("127.0.0.1", None) as running:
        endpoint = clients.Endpoint(running.urls["http"], None, path)
        for level in args.in_flight:
            made = {key: clients.CONCURRENT[key].make(endpoint, level) for key in args.clients}
            cpu: dict[str, list[float]] = {key: [] for key in made}
            rate: dict[str, list[float]] = {key: [] for key in made}
            try:
                for batch in made.values():
                    batch.run(max(2 * level, args.calls))  # connections opened, caches filled
                for number in range(args.rounds):
                    order = list(made.items())
                    for key, batch in order if number % 2 == 0 else reversed(order):
                        if args.no_gc:
                            gc.collect()
                            gc.disable()
                        try:
                            started, used = time.perf_counter(), time.process_time()
                            values = batch.run(args.calls)
                            elapsed = time.perf_counter() - started
                            used = time.process_time() - used
                        finally:
                            gc.enable()
                        if values != [clients.RETVAL] * args.calls:
                            print(f"{key}: wrong retvals")
                            return 1
                        cpu[key].append(used / args.calls * 1e6)
                        rate[key].append(args.calls / elapsed)
            finally:
                for batch in made.values():
                    batch.close()
            print(f"{level} in flight, {path}, {args.rounds} rounds of {args.calls:,} calls"
                  f"{', gc off' if args.no_gc else ''}:")  # fmt: skip
            for key in made:
                cpu_ratio = statistics.median(cpu[key]) / statistics.median(cpu[first])
                rate_ratio = statistics.median(rate[key]) / statistics.median(rate[first])
                cpu_paired = _paired(cpu[key], cpu[first])
                rate_paired = _paired(rate[key], rate[first])
                print(
                    f"  {key:12} {statistics.median(cpu[key]):7.1f} us CPU/call "
                    f"({cpu_ratio:.3f}x, paired {cpu_paired:.3f}x)  "
                    f"{statistics.median(rate[key]):9,.0f} calls/s "
                    f"({rate_ratio:.3f}x, paired {rate_paired:.3f}x)"
                )
    return 0


def _paired(samples: list[float], base: list[float]) -> float:
    """The median of the per-round ratios of ``samples`` to ``base``."""
    return statistics.median(a / b for a, b in zip(samples, base, strict=True))


if __name__ == "__main__":
    raise SystemExit(main())
