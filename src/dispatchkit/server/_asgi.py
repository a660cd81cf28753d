"""TaskApp as an ASGI 3 application (``TaskApp.asgi``).

Every request is decided by the same code as under WSGI
(:meth:`TaskApp._decide`, from plain values): only reading the request (the
scope, and the body from ``receive``) and writing the answer (``send``)
are done here. What the decision leaves to run never blocks the event loop:
an async task is awaited on it, and blocking work (a plain task, the
gateway's apply and look-ups) runs on a worker thread with
:func:`asyncio.to_thread`, that is on the loop's default executor, whose
threads are bounded (``min(32, os.cpu_count() + 4)``): beyond them, calls
of plain tasks queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from dispatchkit.server._http import (
    Answer,
    Awaiting,
    Blocking,
    BodyNeeded,
    HTTPRequest,
    announced_length,
    asgi_request,
    too_large,
)
from dispatchkit.server._refused import Refused

if TYPE_CHECKING:
    from dispatchkit.server._app import TaskApp

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send"]

logger = logging.getLogger("dispatchkit.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _Disconnected(Exception):
    """The client went away before its request body arrived: there is no one to answer."""


class ASGIApp:
    """A :class:`~dispatchkit.server.TaskApp` as an ASGI 3 application.

    Serves ``http`` scopes exactly as the WSGI app does and answers the
    ``lifespan`` protocol (startup completes at once; shutdown closes the
    TaskApp, see :meth:`TaskApp.close`). A ``websocket`` connection is
    refused (the server answers 403).
    """

    __slots__ = ("app",)

    def __init__(self, app: TaskApp) -> None:
        self.app = app

    def __repr__(self) -> str:
        return f"<ASGIApp of {self.app!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            message = await receive()  # websocket.connect; closing before accepting is a 403
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1000})
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = asgi_request(scope)
        try:
            answer = await self._answer(request, receive)
        except _Disconnected:
            return
        except Exception:
            # a failure of TaskApp itself (a codec that cannot encode a failure envelope):
            # answered as the built-in server answers it, never with an HTML page
            logger.exception("the ASGI application failed on %s %s", request.method, request.path)
            body = json.dumps({"status": "failure", "reason": "internal server error"}).encode()
            answer = Answer(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                body,
            )
        headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in answer.headers
        ]
        await send(
            {"type": "http.response.start", "status": answer.status.value, "headers": headers}
        )
        body = b"" if request.method == "HEAD" else answer.body
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, request: HTTPRequest, receive: Receive) -> Answer:
        """Decide ``request`` (reading its body only if that needs it), then run what is left."""
        app = self.app
        try:
            decision = app._decide(request, None)
        except BodyNeeded:
            try:
                body = await self._receive_body(receive, request)
            except Refused as refused:
                decision = app._refusal(refused)
            else:
                decision = app._decide(request, body)
        if isinstance(decision, Blocking):
            return await asyncio.to_thread(decision.run)
        if isinstance(decision, Awaiting):
            return await decision.run()
        return decision

    async def _receive_body(self, receive: Receive, request: HTTPRequest) -> bytes:
        """The request body, at most ``max_body_bytes``: refused unread when Content-Length
        announces more, and as soon as the chunks received add up to more."""
        limit = self.app.max_body_bytes
        length = announced_length(request.headers.get("content-length", ""), limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "http.disconnect":
                raise _Disconnected
            if kind != "http.request":
                continue
            chunk = bytes(message.get("body", b""))
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if length is not None and size < length:
            raise Refused(HTTPStatus.BAD_REQUEST, "request body shorter than Content-Length")
        return b"".join(chunks)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                try:
                    # close() waits for the gateway's calls: not on the loop
                    await asyncio.to_thread(self.app.close)
                except Exception as exc:
                    logger.exception("closing the TaskApp at lifespan shutdown failed")
                    await send(
                        {
                            "type": "lifespan.shutdown.failed",
                            "message": f"{type(exc).__name__}: {exc}",
                        }
                    )
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                return
