"""Peak RSS in fresh processes: after N sequential calls, and with N asyncio calls in flight.

``python -m benchmarks.memory BASE_URL CALLS [--ca PEM]`` makes CALLS
sequential ``Dispatcher.call``s and prints ``{"calls": N, "maxrss_kib": K}``,
the peak RSS of this process in KiB. The parent runs it for a few and for many
calls, alternating, and compares medians: what a call leaves behind shows as
growth with the number of calls.

The peak is ``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: Linux
keeps ``ru_maxrss`` across ``execve``, so a probe started by the suite would
report the suite's own RSS at the fork (the parent's peak, whatever the probe
does). ``ru_maxrss`` is read only where ``/proc`` is missing.

``python -m benchmarks.memory BASE_URL CALLS --client KEY --in-flight N
[--path PATH]`` makes CALLS calls with N in flight through the concurrent
client KEY of benchmarks/clients.py (``aiohttp`` or ``dk_async``), after one
call that fills its lazy imports, and prints the peak RSS before and after:
the growth is what N calls in flight cost (N connections, N tasks, N
answers). The parent alternates the clients, each in a fresh process, so that
neither's heap is the other's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.clients import CONCURRENT, DELAY_MS, KWARGS, RETVAL, Endpoint, delayed, dispatcher
from benchmarks.servers import ROOT

#: The clients whose RSS growth in flight is compared: the baseline first.
IN_FLIGHT_CLIENTS = ("aiohttp", "dk_async")


def peak_rss_kib() -> int:
    """This process image's peak RSS in KiB (``VmHWM``; see the module's docstring)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def probe(base: str, calls: int, ca: str | None) -> int:
    """Make ``calls`` calls here; return this process's peak RSS in KiB."""
    endpoint = Endpoint(base, ca)
    d = dispatcher(endpoint)
    try:
        task = endpoint.task
        for _ in range(calls):
            d.call(task, "GET", **KWARGS)
    finally:
        d.close()
    return peak_rss_kib()


def probe_in_flight(base: str, ca: str | None, path: str, key: str, in_flight: int,
                    calls: int) -> dict[str, int]:  # fmt: skip
    """``calls`` calls with ``in_flight`` at a time through client ``key``; peak RSS in KiB."""
    batch = CONCURRENT[key].make(Endpoint(base, ca, path), in_flight)
    try:
        if batch.run(1) != [RETVAL]:  # lazy imports and first-call caches: not the in-flight cost
            raise AssertionError("the first call did not return the retval")
        before = peak_rss_kib()
        values = batch.run(calls)
        after = peak_rss_kib()
    finally:
        batch.close()
    if len(values) != calls or set(values) != {RETVAL}:
        raise AssertionError(f"{key}: wrong retvals")
    return {"before_kib": before, "peak_kib": after}


def measure_in_flight(
    base: str,
    ca: str | None,
    in_flight: int,
    waves: int,
    repeats: int,
    delay_ms: int = DELAY_MS,
    keys: tuple[str, ...] | list[str] = IN_FLIGHT_CLIENTS,
    step: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """RSS growth of each client in ``keys`` with ``in_flight`` calls in flight.

    Against the endpoint answering ``delay_ms`` late, so that the calls really
    are in flight together; ``waves`` x ``in_flight`` calls per process,
    ``repeats`` fresh processes per client, alternating.
    """
    calls = waves * in_flight
    found: dict[str, list[dict[str, int]]] = {key: [] for key in keys}
    for _ in range(repeats):
        for key in keys:
            step(f"memory: {in_flight:,} in flight, {key}, in a fresh process")
            argv = [sys.executable, "-m", "benchmarks.memory", base, str(calls), "--client", key,
                    "--in-flight", str(in_flight), "--path", delayed(delay_ms)]  # fmt: skip
            if ca:
                argv += ["--ca", ca]
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=120 + calls / 50, cwd=ROOT
            )
            if out.returncode:
                raise RuntimeError(f"memory probe {key} failed: {out.stderr.strip()[-500:]}")
            found[key].append(json.loads(out.stdout))
    growth = {
        key: statistics.median(r["peak_kib"] - r["before_kib"] for r in runs) / 1024
        for key, runs in found.items()
    }
    return {
        "in_flight": in_flight,
        "calls": calls,
        "delay_ms": delay_ms,
        "runs": found,
        "growth_mib": growth,
    }


def measure(
    base: str,
    ca: str | None,
    few: int,
    many: int,
    repeats: int,
    step: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Peak RSS of ``few`` and of ``many`` calls, ``repeats`` fresh processes each."""
    peaks: dict[int, list[int]] = {few: [], many: []}
    for _ in range(repeats):
        for calls in (few, many):
            step(f"memory: {calls} calls in a fresh process")
            argv = [sys.executable, "-m", "benchmarks.memory", base, str(calls)]
            if ca:
                argv += ["--ca", ca]
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=120 + calls / 100, cwd=ROOT
            )
            if out.returncode:
                raise RuntimeError(f"memory probe failed: {out.stderr.strip()[-500:]}")
            peaks[calls].append(json.loads(out.stdout)["maxrss_kib"])
    median_few, median_many = statistics.median(peaks[few]), statistics.median(peaks[many])
    return {
        "few": few,
        "many": many,
        "few_kib": peaks[few],
        "many_kib": peaks[many],
        "growth_mib": (median_many - median_few) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("base")
    parser.add_argument("calls", type=int)
    parser.add_argument("--ca")
    parser.add_argument("--client", choices=IN_FLIGHT_CLIENTS, help="an asyncio client")
    parser.add_argument("--in-flight", type=int, default=0, help="calls in flight (--client)")
    parser.add_argument("--path", default=delayed(), help="the task's path (--client)")
    args = parser.parse_args()
    if args.client:
        found = probe_in_flight(
            args.base, args.ca, args.path, args.client, args.in_flight, args.calls
        )
        print(json.dumps({"client": args.client, "calls": args.calls, **found}))
        return
    peak = probe(args.base, args.calls, args.ca)
    print(json.dumps({"calls": args.calls, "maxrss_kib": peak}))


if __name__ == "__main__":
    main()
