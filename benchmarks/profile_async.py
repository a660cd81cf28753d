"""Where an asyncio client's time goes: one client, N calls in flight, under cProfile.

::

    python -m benchmarks.profile_async [--client dk_async] [--in-flight 64] [--calls 20000]
                                       [--delay-ms 0] [--top 30] [--out FILE.prof]

Starts the suite's target server (benchmarks/target.py) in its own process,
warms the client up, then profiles ``--calls`` calls through
:data:`benchmarks.clients.CONCURRENT` ``[--client]`` (the same code the suite
measures) and prints the functions with the most own time, with their
cumulative time; ``--out`` keeps the profile for ``python -m pstats`` or
snakeviz. ``--client aiohttp`` profiles the hand-written baseline the same way.
cProfile slows Python code more than C code, so compare the two clients'
profiles with each other, never with the suite's timings.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Sequence

from benchmarks import clients, servers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_async", description=__doc__.partition("\n")[0]
    )
    parser.add_argument("--client", default="dk_async", choices=clients.ASYNCIO)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--delay-ms", type=int, default=0, help="0: the fast endpoint")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", help="also write the profile here")
    args = parser.parse_args(argv)
    path = clients.delayed(args.delay_ms) if args.delay_ms else clients.TASK
    with servers.target("127.0.0.1", None) as running:
        endpoint = clients.Endpoint(running.urls["http"], None, path)
        batch = clients.CONCURRENT[args.client].make(endpoint, args.in_flight)
        try:
            batch.run(max(args.in_flight * 2, 1000))  # connections opened, caches filled
            profile = cProfile.Profile()
            started, cpu = time.perf_counter(), time.process_time()
            profile.enable()
            values = batch.run(args.calls)
            profile.disable()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            batch.close()
    if values != [clients.RETVAL] * args.calls:
        print("wrong retvals", file=sys.stderr)
        return 1
    print(
        f"{args.client}: {args.calls:,} calls, {args.in_flight} in flight, {path}: "
        f"{args.calls / elapsed:,.0f} calls/s, {cpu / args.calls * 1e6:.0f} us CPU/call "
        "(under cProfile)"
    )
    if args.out:
        profile.dump_stats(args.out)
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
