"""``dispatchkit demo``: a TaskApp on loopback, called by a Dispatcher, narrated."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TextIO

from dispatchkit._dispatcher import Dispatcher
from dispatchkit.exceptions import DispatchError
from dispatchkit.server import TaskApp

app = TaskApp()


@app.task
def multiply(x: int, y: int) -> int:
    """The seed's example task."""
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


def run(out: TextIO = sys.stdout) -> int:
    """Start the demo server, make calls that succeed and fail, print what happens."""

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    # The server logs each failing task's traceback; here the envelope tells the story.
    server_log = logging.getLogger("dispatchkit.server")
    level = server_log.level
    server_log.setLevel(logging.CRITICAL)
    try:
        return _calls(say)
    finally:
        server_log.setLevel(level)


def _calls(say: Callable[[str], None]) -> int:
    with app.server(port=0) as server, Dispatcher(timeout=5) as d:
        base = server.url
        say(f"TaskApp serving {', '.join(sorted(app.tasks))} on {base}\n")
        calls: list[tuple[str, str, dict[str, object]]] = [
            ("GET", "multiply", {"x": 10, "y": 10}),
            ("POST", "multiply", {"x": 6, "y": 7}),
            ("GET", "greet", {"name": "Grüße", "excited": True}),
            ("POST", "total", {"values": [1, 2, 3, 4]}),
            ("GET", "divide", {"x": 1, "y": 0}),
            ("GET", "multiply", {"x": "ten", "y": 2}),
            ("GET", "nosuchtask", {}),
        ]
        for method, task, kwargs in calls:
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            try:
                result = d.call(f"{base}/{task}", method, **kwargs)
            except DispatchError as exc:
                status = getattr(exc, "status", None)
                said = f" (HTTP {status})" if status else ""
                say(
                    f"  {method:<4} {task}({args}) raised {type(exc).__name__}{said}: {exc.message}"
                )
            else:
                say(f"  {method:<4} {task}({args}) -> {result!r}")
        n = 200
        for i in range(n):
            d.call(f"{base}/multiply", x=i, y=2)
        stats = server.stats
        say(
            f"\n{n} more calls done; the server saw {stats.requests_served} requests "
            f"on {stats.connections_opened} connection(s): keep-alive pooling at work."
        )
    return 0
