"""``dispatchkit demo``: a TaskApp on loopback, called every way dispatchkit can, narrated.

Synchronous calls that succeed and fail, asynchronous calls through the
Celery-compatible API and the Dispatcher's, a fan-out of a few hundred calls, and what
keep-alive pooling made of them, from the server's own counters.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from dispatchkit._compat import URL, HttpDispatchTask
from dispatchkit._dispatcher import Dispatcher
from dispatchkit._models import Result
from dispatchkit.exceptions import DispatchError, RemoteExecuteError
from dispatchkit.server import TaskApp, TaskServer

__all__ = ["FAN_OUT", "app", "run"]

#: Calls in the fan-out section.
FAN_OUT = 300
_WAIT = 10.0  # seconds any one result is waited for; every call is quick and local
_BAR_WIDTH = 30

app = TaskApp()


@app.task
def multiply(x: int, y: int) -> int:
    """Celery 1.0's example task."""
    return x * y


@app.task
def divide(x: float, y: float) -> float:
    return x / y


@app.task
def greet(name: str, excited: bool = False) -> str:
    return f"Hello, {name}{'!' if excited else '.'}"


@app.task
def total(values: list[int]) -> int:
    return sum(values)


class _Demo:
    def __init__(self, out: TextIO, server: TaskServer, dispatcher: Dispatcher) -> None:
        self.out = out
        self.server = server
        self.d = dispatcher
        self.base = server.url
        self.calls = 0  # calls made, to set against the server's counters
        self.ok = True  # False when anything did not go as narrated

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def sync(self, method: str, task: str, **kwargs: Any) -> None:
        shown = f"  {method:<4} {task}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        self.calls += 1
        try:
            retval = self.d.call(f"{self.base}/{task}", method, **kwargs)
        except DispatchError as exc:
            self.say(f"{shown} raised {_describe(exc)}")
        else:
            self.say(f"{shown} -> {retval!r}")

    def wait(self, result: Result) -> None:
        """Wait (bounded) for an asynchronous call and show how it ended."""
        self.calls += 1
        try:
            retval = result.get(timeout=_WAIT)
        except DispatchError as exc:
            self.say(f"    raised {_describe(exc)} (state {result.state})")
        else:
            self.say(f"    -> {retval!r} (state {result.state})")

    def synchronous(self) -> None:
        self.say("Synchronous calls, Dispatcher.call(url, method, **kwargs):")
        self.sync("GET", "multiply", x=10, y=10)
        self.sync("POST", "multiply", x=6, y=7)
        self.sync("GET", "greet", name="Grüße", excited=True)
        self.sync("POST", "total", values=[1, 2, 3, 4])
        self.say()
        self.say("Failures: the task raises, an argument is bad, the task does not exist:")
        self.sync("GET", "divide", x=1, y=0)
        self.sync("GET", "multiply", x="ten", y=2)
        self.sync("GET", "nosuchtask")

    def asynchronous(self) -> None:
        self.say()
        self.say(
            f"Asynchronous calls, each then waited for with .get(timeout={_WAIT:g}); "
            'the log lines are logger "dispatchkit" at INFO:'
        )
        url = f"{self.base}/multiply"
        with _task_log(self.out):
            self.say(f"  URL({url!r}).get_async(x=10, y=10)")
            self.wait(URL(url, dispatcher=self.d).get_async(x=10, y=10))
            self.say(f"  HttpDispatchTask.delay(url={url!r}, x=3, y=4)  # the default dispatcher")
            self.wait(HttpDispatchTask.delay(url=url, x=3, y=4))
            self.say(f"  Dispatcher.submit({self.base + '/divide'!r}, x=1, y=0)")
            self.wait(self.d.submit(f"{self.base}/divide", x=1, y=0))

    def fan_out(self) -> None:
        self.say()
        self.say(f"Fan-out: {FAN_OUT} calls with Dispatcher.submit, then .get() on each:")
        results = [
            self.d.submit(f"{self.base}/multiply", x=i, y=2) for i in range(FAN_OUT)
        ]  # the executor runs pool_maxsize of them at once
        tty = self.out.isatty()
        wrong = 0
        for done, (i, result) in enumerate(enumerate(results), 1):
            try:
                wrong += result.get(timeout=_WAIT) != 2 * i
            except DispatchError:
                wrong += 1
            if tty:
                filled = done * _BAR_WIDTH // FAN_OUT
                bar = "#" * filled + "." * (_BAR_WIDTH - filled)
                self.out.write(f"\r  [{bar}] {done}/{FAN_OUT}")
                self.out.flush()
        self.calls += FAN_OUT
        if tty:
            self.out.write("\n")
        outcome = "all results correct" if not wrong else f"{wrong} wrong or failed"
        self.say(f"  {FAN_OUT}/{FAN_OUT} calls done, {outcome}")
        self.ok = self.ok and not wrong

    def pooling(self) -> None:
        stats = self.server.stats
        opened = max(stats.connections_opened, 1)
        self.say()
        self.say(
            f"Pooling: {self.calls} calls made; the server saw {stats.requests_served} requests "
            f"on {stats.connections_opened} connections opened: "
            f"{self.calls / opened:.1f} calls per connection (keep-alive)."
        )


def _describe(exc: DispatchError) -> str:
    status = f" (HTTP {exc.status})" if isinstance(exc, RemoteExecuteError) and exc.status else ""
    return f"{type(exc).__name__}{status}: {exc.message}"


@contextlib.contextmanager
def _task_log(out: TextIO) -> Iterator[None]:
    """Show the INFO lines of logger ``dispatchkit`` on ``out`` for the duration."""
    log = logging.getLogger("dispatchkit")
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("    [log] %(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


@contextlib.contextmanager
def _quiet_server() -> Iterator[None]:
    # The server logs each failing task's traceback; here the envelope tells the story.
    server_log = logging.getLogger("dispatchkit.server")
    level = server_log.level
    server_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        server_log.setLevel(level)


def run(out: TextIO | None = None) -> int:
    """Run the demo, narrated on ``out`` (stdout); 0 when everything went as told."""
    out = out or sys.stdout
    with _quiet_server(), app.server(port=0) as server, Dispatcher(timeout=5) as d:
        demo = _Demo(out, server, d)
        demo.say(f"TaskApp serving {', '.join(sorted(app.tasks))} on {server.url}/")
        demo.say()
        demo.synchronous()
        demo.asynchronous()
        demo.fan_out()
        demo.pooling()
    return 0 if demo.ok else 1
