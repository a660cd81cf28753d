"""Real Celery workers for tests and benchmarks: subprocesses on a Redis broker.

``celery_worker(queue)`` starts ``celery -A dispatchkit_celery.worker worker``
(prefork) as a subprocess, waits (bounded) until it is ready, and stops it
with a warm shutdown (then a kill) when the ``with`` block ends::

    with celery_worker("my-queue", concurrency=2, url="redis://127.0.0.1:6379/9") as worker:
        ...  # Dispatcher(executor="celery", celery_queue="my-queue", celery_broker=...)
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import IO
from urllib.parse import urlsplit

#: The broker of the test suite: a database of its own, emptied before and after.
REDIS_URL = os.environ.get("DISPATCHKIT_TEST_REDIS", "redis://127.0.0.1:6379/13")


def redis_reachable(url: str = REDIS_URL, timeout: float = 1.0) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 6379), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def flush(url: str = REDIS_URL) -> None:
    """Empty the test database (a dedicated number: nothing else lives there)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


class Worker:
    """A ``celery worker`` process and the log lines it wrote."""

    def __init__(self, proc: subprocess.Popen[str], name: str, lines: queue.Queue[str]) -> None:
        self.proc = proc
        self.name = name
        self._lines = lines
        self.log: list[str] = []

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.log):
                return True
            try:
                self.log.append(self._lines.get(timeout=0.1))
            except queue.Empty:
                if self.proc.poll() is not None:
                    return False
        return False

    def kill(self) -> None:
        """Kill the whole worker at once with SIGKILL: its main process and its pool.

        Nothing runs after it: no warm shutdown, no message handed back, no ack.
        """
        victims = [self.proc.pid, *self.children()]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for pid in victims[1:]:  # the pool processes are reaped by nobody now: wait them out
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)

    def children(self) -> list[int]:
        """The pids of the prefork pool's processes."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        return [int(pid) for pid in out.split()]


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, dead but not reaped yet, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip())
    stream.close()


@contextlib.contextmanager
def celery_worker(
    queue_name: str,
    concurrency: int = 2,
    url: str = REDIS_URL,
    timeout: float = 60.0,
    worker_settings: Mapping[str, object] | None = None,
    app: str = "dispatchkit_celery.worker",
) -> Iterator[Worker]:
    """Start ``celery -A <app> worker`` (prefork) and wait until it is ready.

    ``app`` is the module of the worker's Celery app: by default the plugin's
    own; a module of yours that imports it and registers more tasks (a
    benchmark's no-op, for instance) runs those in a worker started the same way.
    """
    name = f"test-{uuid.uuid4().hex[:8]}@%h"
    env = {
        **os.environ,
        "DISPATCHKIT_CELERY_BROKER": url,
        "DISPATCHKIT_CELERY_QUEUE": queue_name,
        "DISPATCHKIT_CELERY_WORKER_SETTINGS": json.dumps(worker_settings or {"timeout": 10}),
        "DISPATCHKIT_EXECUTOR": "threads",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "-Q",
            queue_name,
            "-n",
            name,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "INFO",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(proc.stderr, lines), daemon=True)
    pump.start()
    worker = Worker(proc, name, lines)
    try:
        if not worker.wait_for("ready.", timeout):
            tail = "\n".join(worker.log[-30:])
            raise RuntimeError(f"celery worker did not become ready in {timeout}s:\n{tail}")
        yield worker
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # warm shutdown: running tasks finish
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        pump.join(timeout=10)
