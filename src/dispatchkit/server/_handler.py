"""The request handler that runs a WSGI application over HTTP/1.1 keep-alive.

It buffers each response whole (task answers are small envelopes), always
sends Content-Length, and answers protocol errors with a JSON failure
envelope instead of http.server's HTML page. It reads the connection through
:class:`_SocketInput`, which bounds every wait by the server's ``idle_timeout``
and each request's head and body together by its ``request_timeout``.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from io import BufferedIOBase, BufferedReader, RawIOBase
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import unquote

from dispatchkit._version import __version__
from dispatchkit.server._http import length_value

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

    from dispatchkit.server._serve import _HTTPServer

__all__ = ["WSGIRequestHandler"]

logger = logging.getLogger("dispatchkit.server")

_DRAIN_LIMIT = 64 * 1024  # unread body a connection may swallow and still be kept alive
_LINGER_SECONDS = 2.0  # reading what a client still sends after we gave up on its body
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
_READ_BUFFER = 8192  # what http.server's own rfile uses (io.DEFAULT_BUFFER_SIZE)


class RequestTimeout(Exception):
    """The request did not arrive in time: it is answered 408 and the connection closed.

    Not a :class:`TimeoutError`, which http.server takes for an idle connection
    and closes without an answer.
    """


class _SocketInput(RawIOBase):
    """The connection's input, for a :class:`~io.BufferedReader`, with every wait bounded.

    A wait for the first byte of a request is bounded by ``idle_timeout``
    (:class:`TimeoutError`: an idle keep-alive connection, closed without an
    answer). From that byte on, or from the start of the request when bytes of
    it are already buffered, the head and body must arrive within
    ``request_timeout`` seconds, each wait still within ``idle_timeout``:
    otherwise :class:`RequestTimeout`, and every later read raises it too.
    """

    def __init__(self, sock: socket.socket, idle_timeout: float, request_timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._idle_timeout = idle_timeout
        self._request_timeout = request_timeout
        self._received = 0
        self._deadline: float | None = None
        self.expired: str | None = None  # why the request timed out

    def begin_request(self, buffered: bool) -> None:
        """A new request: its clock starts now if ``buffered`` bytes of it are here, else
        with its first byte."""
        self.expired = None
        self._deadline = time.monotonic() + self._request_timeout if buffered else None

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        # bytes received so far: a BufferedReader's tell() is this less what it holds
        return self._received

    def readinto(self, buffer: Any) -> int:
        if self.expired is not None:
            raise RequestTimeout(self.expired)
        timeout = self._idle_timeout
        if self._deadline is not None:
            timeout = min(timeout, self._deadline - time.monotonic())
            if timeout <= 0:
                self._expire(self._too_long())
            self._sock.settimeout(timeout)
        try:
            received: int | None = self._sock.recv_into(buffer)
        except TimeoutError:
            if self._deadline is None:
                raise  # no byte of a request yet: an idle connection
            received = None
        finally:
            if timeout != self._idle_timeout:
                self._sock.settimeout(self._idle_timeout)  # for the answer's writes
        if received is None:
            if timeout < self._idle_timeout:
                self._expire(self._too_long())
            self._expire(f"the request stalled for idle_timeout ({self._idle_timeout:g} s)")
        if received and self._deadline is None:
            self._deadline = time.monotonic() + self._request_timeout
        self._received += received
        return received

    def _too_long(self) -> str:
        return f"the request took longer than request_timeout ({self._request_timeout:g} s)"

    def _expire(self, reason: str) -> NoReturn:
        self.expired = reason
        raise RequestTimeout(reason)


class _BodyInput:
    """``wsgi.input``: the request body, never a byte past its Content-Length."""

    def __init__(self, stream: BufferedIOBase, length: int) -> None:
        self._stream = stream
        self.remaining = length

    def _limit(self, size: int | None) -> int:
        return self.remaining if size is None or size < 0 else min(size, self.remaining)

    def read(self, size: int | None = -1) -> bytes:
        size = self._limit(size)
        data = self._stream.read(size) if size else b""
        # a short read means the client went away: nothing more will come
        self.remaining = self.remaining - len(data) if len(data) == size else 0
        return data

    def readline(self, size: int | None = -1) -> bytes:
        size = self._limit(size)
        if not size:
            return b""
        data = self._stream.readline(size)
        self.remaining = self.remaining - len(data) if data else 0
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> _BodyInput:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def drain(self, limit: int) -> bool:
        """Discard the unread body if it is at most ``limit`` bytes; True when all is read."""
        if self.remaining > limit:
            return False
        while self.remaining and self.read(min(self.remaining, 65536)):
            pass
        return True


class WSGIRequestHandler(BaseHTTPRequestHandler):
    """Runs ``server.app`` for each request on a connection until it closes or idles out.

    A chunked request body is refused with 411 (task arguments are small, and
    every HTTP client sends Content-Length for a bytes body); a body the app
    leaves unread is drained when small, else the connection is closed. A
    request that does not arrive in time (see :class:`_SocketInput`) is answered
    408 and the connection closed.
    """

    protocol_version = "HTTP/1.1"
    # http.server answers a request line it cannot parse as HTTP/0.9, that is with
    # no status line or headers; every client today would rather see a 400
    default_request_version = "HTTP/1.0"
    server_version = f"dispatchkit/{__version__}"
    # headers and body go out in separate writes; without this, Nagle's algorithm
    # and delayed ACKs add tens of milliseconds to every keep-alive request
    disable_nagle_algorithm = True
    server: _HTTPServer
    socket_input: _SocketInput
    _linger = False

    def setup(self) -> None:
        super().setup()
        # bounds every wait on the socket, the answer's writes included
        self.connection.settimeout(self.server.idle_timeout)
        self.rfile.close()
        self.socket_input = _SocketInput(
            self.connection, self.server.idle_timeout, self.server.request_timeout
        )
        self.rfile = BufferedReader(self.socket_input, _READ_BUFFER)

    def handle_one_request(self) -> None:
        # bytes received but not read yet are the start of this request (pipelined)
        self.socket_input.begin_request(buffered=self.socket_input.tell() > self.rfile.tell())
        # what send_error needs if the request line never arrives whole
        self.command = self.requestline = self.request_version = ""
        try:
            super().handle_one_request()
        except RequestTimeout as exc:
            self._timed_out(str(exc))

    def _timed_out(self, reason: str) -> None:
        # nothing of an answer was sent (an interim 100 Continue at most); the
        # client may still be sending, so read on a little for it to see the 408
        self._linger = True
        self.send_error(HTTPStatus.REQUEST_TIMEOUT, reason)

    def _run_wsgi(self) -> None:
        self.server.stats._count_request()
        if "Transfer-Encoding" in self.headers:
            self._linger = True
            self.send_error(HTTPStatus.LENGTH_REQUIRED, "send the request body with Content-Length")
            return
        # several differing Content-Length headers are a request-smuggling classic
        lengths = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        length_text = lengths.pop() if len(lengths) == 1 else ""
        if lengths or not (length_text == "" or (length_text.isascii() and length_text.isdigit())):
            self._linger = True
            self.send_error(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
            return
        length = length_value(length_text)
        if length is None:
            self._linger = True
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "Content-Length too large")
            return
        body_input = _BodyInput(self.rfile, length)
        try:
            code, phrase, headers, body = self._call_app(self._environ(body_input, length_text))
        except RequestTimeout as exc:
            self._timed_out(str(exc))
            return
        except Exception:
            if self.socket_input.expired is not None:  # the app failed on the request timeout
                self._timed_out(self.socket_input.expired)
                return
            logger.exception("the WSGI application failed on %s %s", self.command, self.path)
            self._linger = not body_input.drain(_DRAIN_LIMIT)
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error")
            return
        if not body_input.drain(_DRAIN_LIMIT):  # a RequestTimeout here: handle_one_request
            # the rest of the body would be read as the next request
            self.close_connection = True
            self._linger = True
        if self.socket_input.expired is not None:  # the app answered a request it did not get whole
            self._timed_out(self.socket_input.expired)
            return
        self._send(code, phrase, headers, body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _run_wsgi

    def _environ(self, body_input: _BodyInput, length_text: str) -> WSGIEnvironment:
        path, _, query = self.path.partition("?")
        environ: WSGIEnvironment = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            # the request line was decoded as latin-1, as PEP 3333 wants PATH_INFO
            "PATH_INFO": unquote(path, encoding="latin-1"),
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": length_text,
            "SERVER_NAME": self.server.server_name,
            "SERVER_PORT": str(self.server.server_port),
            "SERVER_PROTOCOL": self.request_version,
            "SERVER_SOFTWARE": self.server_version,
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_PORT": str(self.client_address[1]),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": body_input,
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in self.headers.items():
            key = name.upper().replace("-", "_")
            # "X_Foo" would pose as "X-Foo" once mapped; drop it like other servers do
            if "_" in name or key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                continue
            key = "HTTP_" + key
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    def _call_app(self, environ: WSGIEnvironment) -> tuple[int, str, list[tuple[str, str]], bytes]:
        started: list[tuple[str, list[tuple[str, str]]]] = []
        chunks: list[bytes] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: object = None, /
        ) -> Callable[[bytes], object]:
            if started and exc_info is None:
                raise RuntimeError("start_response called twice without exc_info")
            # nothing is sent before the app returns, so a later call may replace the first
            started[:] = [(status, list(headers))]
            return chunks.append

        result = self.server.app(environ, start_response)
        try:
            chunks.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if not started:
            raise RuntimeError("the application did not call start_response")
        status, headers = started[0]
        code, _, phrase = status.partition(" ")
        if not (len(code) == 3 and code.isdigit()):
            raise RuntimeError(f"invalid WSGI status {status!r}")
        return int(code), phrase, headers, b"".join(chunks)

    def _send(self, code: int, phrase: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(code, phrase or None)
        length = str(len(body))
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length" and self.command == "HEAD":
                length = value  # the length a GET would have had
            elif lowered == "connection" and "close" in value.lower():
                self.close_connection = True
            if lowered not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", length)
        self._send_connection_header()
        self.end_headers()
        if self.command != "HEAD" and code not in (204, 304):
            self.wfile.write(body)

    def _send_connection_header(self) -> None:
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer protocol errors with a failure envelope, never an HTML page; then close."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        self.log_error("code %d, message %s", code, message)
        body = json.dumps({"status": "failure", "reason": message or phrase}).encode()
        self.send_response(code, phrase or None)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self._send_connection_header()
        self.end_headers()
        if getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def finish(self) -> None:
        super().finish()
        if self._linger:
            self._discard_rest()

    def _discard_rest(self) -> None:
        # Closing a socket with unread input sends a reset, which can destroy the
        # answer (a 413, say) before the client reads it. Reading on for a
        # bounded while after shutting down our side lets the client see it.
        deadline = time.monotonic() + _LINGER_SECONDS
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(65536):
                    break
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)
