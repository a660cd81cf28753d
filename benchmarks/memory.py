"""Peak RSS after N sequential ``Dispatcher.call``s, each N in a fresh process.

``python -m benchmarks.memory BASE_URL CALLS [--ca PEM]`` makes CALLS calls and
prints ``{"calls": N, "maxrss_kib": K}`` (``ru_maxrss`` is in KiB on Linux).
The parent runs it for a few and for many calls, alternating, and compares
medians: what a call leaves behind shows as growth with the number of calls.
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

from benchmarks.clients import KWARGS, Endpoint, dispatcher
from benchmarks.servers import ROOT


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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


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
    args = parser.parse_args()
    peak = probe(args.base, args.calls, args.ca)
    print(json.dumps({"calls": args.calls, "maxrss_kib": peak}))


if __name__ == "__main__":
    main()
