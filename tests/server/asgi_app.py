"""The TaskApps that tests/server/test_asgi.py serves under a real uvicorn process.

``uvicorn asgi_app:asgi --app-dir tests/server`` serves ``app`` (with the
gateway); ``asgi_app:signed`` the same tasks behind a signing secret. The
tests import this module too, for its constants. Nothing here starts a thread
or opens a socket at import.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from dispatchkit.server import TaskApp

#: A fixed secret, so that the test process signs with the key the server checks.
SECRET = "whsec_ZGlzcGF0Y2hraXQtYXNnaS10ZXN0cy1zaWduaW5nLWtleQ=="
MAX_BODY_BYTES = 1024
#: A task never waits longer than this for the test to release it.
GATE_TIMEOUT = 10.0

_lock = threading.Lock()
_gates: dict[str, threading.Event] = {}
_async_gates: dict[str, asyncio.Event] = {}


def _gate(key: str) -> threading.Event:
    with _lock:
        return _gates.setdefault(key, threading.Event())


def _async_gate(key: str) -> asyncio.Event:
    # created, set and awaited on the one loop the async tasks share (the server's)
    return _async_gates.setdefault(key, asyncio.Event())


def make_app(**options: Any) -> TaskApp:
    options.setdefault("max_body_bytes", MAX_BODY_BYTES)
    app = TaskApp(gateway=True, **options)

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    @app.task
    async def amultiply(x: int, y: int) -> int:
        await asyncio.sleep(0)
        return x * y

    @app.task
    async def total(xs: list[int], scale: float = 1.0) -> float:
        return sum(xs) * scale

    @app.task
    def echo(s: str) -> str:
        return s

    @app.task
    def boom() -> None:
        raise RuntimeError("kaput")

    @app.task
    async def aboom() -> None:
        await asyncio.sleep(0)
        raise ValueError("async kaput")

    @app.task
    def sync_thread() -> str:
        return threading.current_thread().name

    @app.task
    async def async_thread() -> str:
        return threading.current_thread().name

    @app.task
    def block(key: str) -> str:
        """Hold a worker thread until ``release(key)`` (or GATE_TIMEOUT)."""
        _gate(f"{key}/started").set()
        return "released" if _gate(key).wait(GATE_TIMEOUT) else "timed out"

    @app.task
    def started(key: str) -> bool:
        return _gate(f"{key}/started").is_set()

    @app.task
    def release(key: str) -> bool:
        _gate(key).set()
        return True

    @app.task
    async def await_gate(key: str) -> str:
        """Await an asyncio.Event that ``open_gate(key)`` sets, on the same loop."""
        _async_gate(f"{key}/started").set()
        try:
            await asyncio.wait_for(_async_gate(key).wait(), GATE_TIMEOUT)
        except asyncio.TimeoutError:
            return "timed out"
        return "opened"

    @app.task
    async def gate_started(key: str) -> bool:
        return _async_gate(f"{key}/started").is_set()

    @app.task
    async def open_gate(key: str) -> bool:
        _async_gate(key).set()
        return True

    return app


app = make_app()
asgi = app.asgi  # uvicorn takes `module:attribute`: expose the ASGI app as a name
signed_app = make_app(signing_secret=SECRET)
signed = signed_app.asgi
