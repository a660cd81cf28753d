"""Soak: many calls through one Dispatcher from many threads, 1 % of them answered 503.

The full run (100,000 calls from 32 threads, a few minutes)::

    .venv/bin/python tests/soak.py                      # --calls 100000 --threads 32
    .venv/bin/python tests/soak.py --calls 10000        # what tests/test_soak.py runs

A :class:`~dispatchkit.server.TaskApp` on 127.0.0.1 serves one task behind a
WSGI middleware that answers every 100th request (a deterministic counter)
with ``503 Service Unavailable``; the calls are idempotent GETs, so the
built-in retry policy sends them again. Every call has its own task id
(``soak-<n>``), sent as ``Idempotency-Key``; both sides count per call:

* the client, in a ``dispatchkit_prepare_request`` hook: attempts made;
* the server: requests seen (503s included) and task runs.

A run is good when every call returned its own correct result (nothing lost,
nothing mixed up), every task ran exactly once (nothing duplicated), every
attempt the client made reached the server exactly once, the server saw at
most ``pool_maxsize`` connections, resident memory stayed flat (sampled from
``/proc/self/status`` during the run) and, once the Dispatcher and the server
are closed, no thread and no file descriptor is left open that was not there
before (counted after a garbage collection).

The counters are preallocated arrays indexed by call, so the bookkeeping
itself does not grow memory while the run is measured.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dispatchkit import Dispatcher, Request, hookimpl
from dispatchkit.server import TaskApp, TaskServer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

KEY_PREFIX = "soak-"
#: Every this-many-th request the server receives is answered 503.
FAIL_EVERY = 100
#: Resident memory may grow this much past the sample taken after the warm-up.
RSS_SLACK_BYTES = 16 * 1024 * 1024


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/status (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def index_of(key: str | None) -> int:
    if not key or not key.startswith(KEY_PREFIX):
        raise ValueError(f"not a soak task id: {key!r}")
    return int(key[len(KEY_PREFIX) :])


class Counters:
    """Per-call counters in preallocated arrays (one slot per call), and the injector's count."""

    def __init__(self, calls: int) -> None:
        self.client_attempts = array("I", bytes(4 * calls))
        self.server_requests = array("I", bytes(4 * calls))
        self.task_runs = array("I", bytes(4 * calls))
        self.lock = threading.Lock()
        self.requests = 0
        self.injected = 0


class FaultInjector:
    """WSGI middleware: every ``FAIL_EVERY``-th request gets a 503 instead of the app's answer."""

    def __init__(self, app: WSGIApplication, counters: Counters) -> None:
        self.app = app
        self.counters = counters

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        c = self.counters
        i = index_of(environ.get("HTTP_IDEMPOTENCY_KEY"))
        with c.lock:
            c.requests += 1
            c.server_requests[i] += 1
            fail = c.requests % FAIL_EVERY == 0
            if fail:
                c.injected += 1
        if fail:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"injected fault"]
        return self.app(environ, start_response)


class AttemptCounter:
    """Counts, per call, the attempts the client makes (each runs this hook once)."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        i = index_of(request.task_id)
        with self.counters.lock:
            self.counters.client_attempts[i] += 1


def make_app(counters: Counters) -> TaskApp:
    app = TaskApp()

    @app.task
    def work(i: int, token: str) -> list[Any]:
        with counters.lock:
            counters.task_runs[i] += 1
        return [i, token[::-1]]

    return app


@dataclass
class SoakResult:
    calls: int
    threads: int
    pool_maxsize: int
    seconds: float = 0.0
    ok: int = 0
    wrong: list[str] = field(default_factory=list)  # the first few problems, described
    problems: int = 0
    injected: int = 0
    server_requests: int = 0
    client_attempts: int = 0
    connections_opened: int = 0
    rss_samples: list[tuple[int, int]] = field(default_factory=list)  # (calls done, bytes)
    threads_before: int = 0
    threads_after: int = 0
    fds_before: int = 0
    fds_after: int = 0

    def problem(self, text: str) -> None:
        self.problems += 1
        if len(self.wrong) < 20:
            self.wrong.append(text)

    @property
    def rss_growth(self) -> int:
        """Growth of resident memory from the sample after the warm-up (10 %) to the last."""
        warm = [rss for done, rss in self.rss_samples if done >= self.calls // 10]
        return max(warm) - warm[0] if warm else 0

    def failures(self) -> list[str]:
        """Everything that makes the run bad; empty for a good run."""
        found = list(self.wrong)
        if self.problems > len(self.wrong):
            found.append(f"... {self.problems - len(self.wrong)} more problems")
        if self.ok != self.calls:
            found.append(
                f"{self.calls - self.ok} of {self.calls} calls did not return their result"
            )
        if self.server_requests != self.calls + self.injected:
            found.append(
                f"server saw {self.server_requests} requests, expected "
                f"{self.calls} calls + {self.injected} injected 503s"
            )
        if self.connections_opened > self.pool_maxsize:
            found.append(
                f"{self.connections_opened} connections > pool_maxsize {self.pool_maxsize}"
            )
        if self.rss_growth > RSS_SLACK_BYTES:
            found.append(f"RSS grew {self.rss_growth / 2**20:.1f} MiB after the warm-up")
        # More after is a leak; fewer is something from before the run ending meanwhile.
        if self.threads_after > self.threads_before:
            found.append(f"threads: {self.threads_before} before, {self.threads_after} after")
        if self.fds_after > self.fds_before:
            found.append(f"file descriptors: {self.fds_before} before, {self.fds_after} after")
        return found

    def report(self) -> str:
        rate = self.calls / self.seconds if self.seconds else 0.0
        samples = ", ".join(f"{done}:{rss / 2**20:.1f}" for done, rss in self.rss_samples)
        lines = [
            f"{self.calls} calls from {self.threads} threads in {self.seconds:.1f} s "
            f"({rate:.0f} calls/s); {self.ok} correct results",
            f"503s injected: {self.injected}; server requests: {self.server_requests}; "
            f"client attempts: {self.client_attempts}",
            f"connections opened: {self.connections_opened} (pool_maxsize {self.pool_maxsize})",
            f"RSS MiB by calls done: {samples}",
            f"RSS growth after warm-up: {self.rss_growth / 2**20:.2f} MiB",
            f"threads before/after: {self.threads_before}/{self.threads_after}; "
            f"fds before/after: {self.fds_before}/{self.fds_after}",
        ]
        failures = self.failures()
        lines.append("OK" if not failures else "FAILED:\n  " + "\n  ".join(failures))
        return "\n".join(lines)


def _settle(expected: int, count: Any, timeout: float) -> int:
    """Poll ``count()`` until it is at most ``expected`` or ``timeout`` passes; return it."""
    deadline = time.monotonic() + timeout
    while (value := int(count())) > expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def run(
    calls: int = 100_000, threads: int = 32, pool_maxsize: int = 16, samples: int = 50
) -> SoakResult:
    """Run the soak; the result says what happened (see :meth:`SoakResult.failures`)."""
    result = SoakResult(calls, threads, pool_maxsize)
    counters = Counters(calls)
    app = FaultInjector(make_app(counters), counters)
    sample_every = max(1, calls // samples)
    done = 0
    done_lock = threading.Lock()
    gc.collect()  # what earlier code left for the collector is not counted as ours
    result.threads_before = threading.active_count()
    result.fds_before = fd_count()
    result.rss_samples.append((0, rss_bytes()))

    server = TaskServer(app, port=0, idle_timeout=60).start()
    dispatcher = Dispatcher(
        timeout=10,
        pool_maxsize=pool_maxsize,
        retry_attempts=5,
        retry_backoff=0.005,
        plugins=[AttemptCounter(counters)],
    )
    url = f"{server.url}/work"

    def worker(first: int) -> None:
        nonlocal done
        for i in range(first, calls, threads):
            token = f"t{i}"
            try:
                value = dispatcher.apply(
                    url, "GET", {"i": i, "token": token}, task_id=f"{KEY_PREFIX}{i}"
                )
            except Exception as exc:
                with done_lock:
                    result.problem(f"call {i} raised {type(exc).__name__}: {exc}")
                continue
            with done_lock:
                if value == [i, token[::-1]]:
                    result.ok += 1
                else:
                    result.problem(f"call {i} returned {value!r}")
                done += 1
                if done % sample_every == 0:
                    result.rss_samples.append((done, rss_bytes()))

    workers = [
        threading.Thread(target=worker, args=(t,), name=f"soak-{t}", daemon=True)
        for t in range(threads)
    ]
    started = time.perf_counter()
    try:
        for thread in workers:
            thread.start()
        deadline = time.monotonic() + max(60.0, calls / 100)  # at least 100 calls/s
        for thread in workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in workers if thread.is_alive()]
        if stuck:
            result.problem(f"worker threads still running at the deadline: {stuck}")
        result.seconds = time.perf_counter() - started
    finally:
        dispatcher.close()
        server.stop()

    result.connections_opened = server.stats.connections_opened
    result.injected = counters.injected
    result.server_requests = sum(counters.server_requests)
    result.client_attempts = sum(counters.client_attempts)
    for i in range(calls):
        runs, seen, made = (
            counters.task_runs[i],
            counters.server_requests[i],
            counters.client_attempts[i],
        )
        if runs != 1 or seen != made:
            result.problem(f"call {i}: task ran {runs}x; {made} attempts made, {seen} seen")
    # The server's connection threads end once their sockets are closed: give them a moment.
    result.threads_after = _settle(result.threads_before, threading.active_count, 10)
    result.fds_after = _settle(result.fds_before, fd_count, 10)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--pool-maxsize", type=int, default=16)
    args = parser.parse_args(argv)
    result = run(args.calls, args.threads, args.pool_maxsize)
    print(result.report(), flush=True)
    return 0 if not result.failures() else 1


if __name__ == "__main__":
    sys.exit(main())
