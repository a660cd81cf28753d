"""The benchmark suite's command: ``python -m benchmarks`` from the repository root.

Starts the target server (or nginx), measures every client side by side over
loopback HTTP and HTTPS, the concurrency sweeps, peak memory in fresh
processes, then the same matrix over a link with added round-trip time between
two network namespaces; prints the tables and the targets, writes
``benchmarks.json``, ``benchmarks.txt`` and ``benchmarks.png`` under ``--out``.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import checks, clients, memory, netns, report, servers
from benchmarks.measure import Plan, run_matrix
from benchmarks.progress import Progress

DEFAULT_OUT = servers.ROOT / "benchmarks" / "results"
WORKER_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Mode:
    """How much to measure: sample sizes and rounds for each part."""

    loopback: dict[str, Any]
    rtt: dict[str, Any]
    memory: dict[str, Any]
    netns: bool
    rtt_ms: list[float] = field(default_factory=lambda: [1.0, 10.0])
    #: RSS growth with this many asyncio calls in flight (benchmarks.memory.measure_in_flight).
    in_flight: dict[str, Any] = field(default_factory=dict)


MODES = {
    "full": Mode(
        loopback={"rounds": 15, "sample_s": 0.1, "warmup_s": 0.3, "concurrency_rounds": 9,
                  "batch": 1000, "threads": [1, 4, 16, 64, 256, 1024],
                  "async_levels": [4, 16, 64, 256, 1024], "delayed": [4, 16, 64, 256, 1024],
                  "delayed_rounds": 9, "delayed_waves": 8, "max_batch": 4096,
                  "sample_min_s": 0.4, "sample_max_s": 2.5, "level_budget_s": 15.0,
                  "sample_limit_s": 20.0},
        rtt={"rounds": 5, "sample_s": 0.05, "warmup_s": 0.05, "min_calls": 3,
             "concurrency_rounds": 3, "batch": 256, "threads": [4, 16, 64], "capacity": False},
        memory={"few": 100, "many": 10_000, "repeats": 3, "schemes": ["http", "https"]},
        netns=True,
        in_flight={"in_flight": 1000, "waves": 3, "repeats": 3},
    ),
    "quick": Mode(
        loopback={"rounds": 9, "sample_s": 0.03, "warmup_s": 0.05, "min_calls": 2,
                  "concurrency_rounds": 3, "batch": 300, "threads": [1, 4, 16, 64, 256],
                  "async_levels": [16, 256], "sample_max_s": 1.0, "level_budget_s": 3.0,
                  "sample_limit_s": 5.0},
        rtt={"rounds": 3, "sample_s": 0.02, "warmup_s": 0.02, "min_calls": 2,
             "concurrency_rounds": 2, "batch": 64, "threads": [16], "capacity": False},
        memory={"few": 100, "many": 2_000, "repeats": 1, "schemes": ["http"]},
        netns=False,
        in_flight={"in_flight": 1000, "waves": 1, "repeats": 1},
    ),
    "smoke": Mode(
        loopback={"rounds": 1, "sample_s": 0.002, "warmup_s": 0.002, "min_calls": 1,
                  "concurrency_rounds": 1, "batch": 16, "threads": [1, 4], "async_levels": [4],
                  "delayed": [4], "delayed_rounds": 1, "delayed_waves": 2, "delay_ms": 5,
                  "sample_max_s": 1.0, "level_budget_s": 2.0, "sample_limit_s": 10.0},
        rtt={"rounds": 1, "sample_s": 0.002, "warmup_s": 0.002, "min_calls": 1,
             "concurrency_rounds": 1, "batch": 16, "threads": [4], "capacity": False},
        memory={"few": 5, "many": 20, "repeats": 1, "schemes": ["http"]},
        netns=False,
        rtt_ms=[1.0],
        in_flight={"in_flight": 16, "waves": 1, "repeats": 1, "delay_ms": 5},
    ),
}  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.partition("\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced counts, no namespaces: under a minute (CI runs this)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the tiniest run, seconds long, to prove the suite works (tests)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target FAILs"
    )
    parser.add_argument(
        "--nginx", action="store_true", help="serve the envelope with nginx when it is on PATH"
    )
    parser.add_argument(
        "--netns",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure over a veth link with added RTT (default: on, off with "
        "--quick); needs root and iproute2",
    )
    parser.add_argument(
        "--rtt",
        type=_floats,
        default=None,
        metavar="MS[,MS]",
        help="round-trip times to add, in ms (default: 1,10)",
    )
    parser.add_argument(
        "--server-workers",
        type=int,
        default=1,
        metavar="N",
        help="processes of the target server (default: 1)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="where results go (default: benchmarks/results)",
    )
    return parser.parse_args(argv)  # fmt: skip


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


ServerFactory = Callable[..., AbstractContextManager[servers.Running]]


def choose_server(args: argparse.Namespace, progress: Callable[[str], None]) -> ServerFactory:
    if args.nginx:
        if servers.nginx_path() is not None:
            return servers.nginx
        progress("--nginx: nginx is not on PATH; using the Python target server instead")
    return servers.target


def run_worker(prefix: Sequence[str], plan: Plan) -> dict[str, Any]:
    """Run the matrix in a child process (inside a namespace); return its JSON."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "benchmarks.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=servers.ROOT,
        start_new_session=True,  # Ctrl-C reaches only us; we stop it in finally
    )
    try:
        out, _ = proc.communicate(json.dumps(asdict(plan)), timeout=WORKER_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    if proc.returncode:
        raise RuntimeError(f"the client worker failed with status {proc.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


def rtt_section(
    mode: Mode,
    rtts: list[float],
    certs: servers.Certs | None,
    server: ServerFactory,
    workers: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    reason = netns.unavailable()
    if reason:
        note = f"not measured: {reason}; the loopback part ran"
        say(f"RTT: {note}")
        return {"method": None, "note": note, "runs": {}}
    runs: dict[str, Any] = {}
    ca = certs.ca if certs else None
    with netns.link() as link:
        if link.netem:
            method, note = "netem", "tc netem on a veth pair between two network namespaces"
        else:
            method = "relay"
            note = (
                "this kernel has no netem (CONFIG_NET_SCH_NETEM); RTT added by the user-space "
                "relay (benchmarks/relay.py) in the server's namespace, over a veth pair"
            )
        say(f"RTT: {note}")
        host = netns.SERVER_ADDR if link.netem else "127.0.0.1"
        with server(host, certs, workers, prefix=link.prefix(link.server)) as running:
            for rtt in rtts:
                with contextlib.ExitStack() as stack:
                    if link.netem:
                        link.set_rtt(rtt)
                        urls = running.urls
                    else:
                        urls = stack.enter_context(
                            servers.relay(rtt, netns.SERVER_ADDR, running.urls,
                                          prefix=link.prefix(link.server))
                        )  # fmt: skip
                    plan = Plan(f"{rtt:g} ms RTT", urls, ca, running.stats, **mode.rtt)
                    runs[f"{rtt:g}"] = run_worker(link.prefix(link.client), plan)
    return {"method": method, "note": note, "runs": runs}


def memory_in_flight(
    base: str, ca: str | None, plan: dict[str, Any], say: Callable[[str], None]
) -> dict[str, Any]:
    """RSS growth of each asyncio client with ``plan["in_flight"]`` calls in flight."""
    keys = [k for k in memory.IN_FLIGHT_CLIENTS if k not in clients.missing(clients.CONCURRENT)]
    if not keys:
        return {"error": "aiohttp is not installed"}
    steps = Progress("memory in flight", len(keys) * plan["repeats"])
    try:
        return memory.measure_in_flight(base, ca, keys=keys, step=steps.step, **plan)
    except Exception as exc:  # one part failing must not lose the others
        error = f"{type(exc).__name__}: {exc}"
        say(f"memory in flight: {error[-300:]}")
        return {"error": error}
    finally:
        steps.close()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM unwind like Ctrl-C, so that every ``finally`` cleans up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[name]
    use_netns = mode.netns if args.netns is None else args.netns
    rtts = args.rtt or mode.rtt_ms
    args.out.mkdir(parents=True, exist_ok=True)
    say = Progress("benchmarks", 1).note
    started = time.time()
    results: dict[str, Any] = {"meta": {
        "mode": name,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        **report.commit(),  # docs/benchmarks.md names the commit a run measured
        "versions": report.versions(),
        "machine": report.machine(),
        "plugins": clients.plugins_on(),
        "plugins_note": "entry-point plugins disabled (as DISPATCHKIT_DISABLE_PLUGIN_AUTOLOAD=1);"
                        " the dk_hooks row adds the example plugin's two per-call hooks",
    }}  # fmt: skip
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="dkbench-") as tmp:
        certs = servers.make_certs(Path(tmp))
        if certs is None:
            say("trustme is not installed: HTTP only")
        ca = certs.ca if certs else None
        server = choose_server(args, say)
        with server("127.0.0.1", certs, args.server_workers) as running:
            results["meta"]["server"] = running.name
            say(f"loopback: {running.name} at {', '.join(running.urls.values())}")
            loopback = dict(mode.loopback)
            delayed = running.stats == "target"  # only the Python target has /delay/<ms>/
            if not delayed and (loopback.get("delayed") or mode.in_flight):
                say(f"{running.name} answers no delayed endpoint: the 50 ms part and the "
                    "memory in flight are left out")  # fmt: skip
                loopback["delayed"] = []
            plan = Plan("loopback", running.urls, ca, running.stats, **loopback)
            results["loopback"] = run_matrix(plan)
            results["memory"] = {}
            memory_plan = dict(mode.memory)
            schemes = memory_plan.pop("schemes")
            steps = Progress("memory", len(schemes) * memory_plan["repeats"] * 2)
            for scheme in schemes:
                if scheme in running.urls:
                    try:
                        results["memory"][scheme] = memory.measure(
                            running.urls[scheme], ca, step=steps.step, **memory_plan
                        )
                    except Exception as exc:  # one part failing must not lose the others
                        results["memory"][scheme] = {"error": f"{type(exc).__name__}: {exc}"}
                        say(f"memory {scheme}: {results['memory'][scheme]['error'][-300:]}")
            steps.close()
            if mode.in_flight and delayed:
                results["memory_in_flight"] = memory_in_flight(
                    running.urls["http"], ca, mode.in_flight, say
                )
        if use_netns:
            try:
                results["rtt"] = rtt_section(mode, rtts, certs, server, args.server_workers, say)
            except Exception as exc:
                note = f"failed: {type(exc).__name__}: {exc}"
                say(f"RTT: {note}")
                results["rtt"] = {"method": None, "note": note, "runs": {}}
        else:
            results["rtt"] = {"method": None, "note": "not measured (--quick or --no-netns)",
                              "runs": {}}  # fmt: skip
    results["meta"]["duration_s"] = round(time.time() - started, 1)
    found = checks.evaluate(results)
    results["checks"] = [check.to_dict() for check in found]
    text = report.text(results, found)
    print(text)
    report.write_json(results, args.out / "benchmarks.json")
    (args.out / "benchmarks.txt").write_text(text + "\n")
    written = ["benchmarks.json", "benchmarks.txt"]
    if report.plot(results, args.out / "benchmarks.png"):
        written.append("benchmarks.png")
    else:
        say("matplotlib is not installed: no plot")
    say(f"wrote {', '.join(written)} to {args.out} in {results['meta']['duration_s']:.0f}s")
    failed = [c for c in found if c.status == "FAIL"]
    if failed and args.check:
        say(f"--check: {len(failed)} target(s) missed")
        return 1
    return 0
