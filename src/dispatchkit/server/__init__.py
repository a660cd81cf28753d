"""Serve Python functions as HTTP callback tasks.

::

    from dispatchkit.server import TaskApp

    app = TaskApp()

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    app.serve(port=8000)  # or run ``app`` under any WSGI server

:class:`TaskApp` is a plain WSGI application, and ``app.asgi`` the same app
for ASGI servers (``asgi = app.asgi``, then ``uvicorn tasks:asgi``); tasks
may be ``async def``. :class:`TaskServer` is a small threaded HTTP/1.1 server
on the standard library that keeps connections alive. See ``docs/server.md``.
"""

from __future__ import annotations

from dispatchkit.server._app import TaskApp
from dispatchkit.server._serve import ServerStats, TaskServer

__all__ = ["ServerStats", "TaskApp", "TaskServer"]
