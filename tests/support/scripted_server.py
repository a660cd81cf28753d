"""A socket-level HTTP server that does exactly what a test scripts, for fault injection.

The server listens on 127.0.0.1 (port 0: the kernel picks one) and runs a
*script* on every accepted connection. A script is a callable taking the
:class:`Connection`, or a list of steps (callables built by the helpers below:
:func:`read`, :func:`send`, :func:`respond`, :func:`sleep`, :func:`wait`,
:func:`trickle`, :func:`close`, :func:`reset`, :func:`serve`) run in order; :func:`per_connection`
gives each connection its own script. Nothing here parses HTTP beyond what a
script needs (a request head and its Content-Length body), so a script can
break the protocol anywhere.

Everything is bounded: each connection has a deadline (``connection_deadline``
seconds after it was accepted) that every socket operation and sleep respects;
at most ``max_connections`` connections run a script (later ones are closed at
once and counted in ``connections_rejected``); :meth:`ScriptedServer.stop`
wakes every blocked thread, joins all of them with a timeout, closes every
socket and raises if a thread did not end or a script failed with anything but
a socket error.

Counters (read them from the test's thread; they only grow):
``connections_accepted``, ``connections_rejected``, ``peer_closed`` (connections
on which the client closed its end before a new request), and ``requests``,
every request read, with its raw head and body.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType

__all__ = [
    "Connection",
    "RawRequest",
    "ScriptedServer",
    "close",
    "envelope",
    "per_connection",
    "read",
    "reset",
    "respond",
    "response",
    "send",
    "serve",
    "sleep",
    "trickle",
    "wait",
]

_HEAD_LIMIT = 64 * 1024
_ACCEPT_POLL = 0.05  # how quickly the accept loop notices stop()

Step = Callable[["Connection"], object]
"""One step of a list script; returning ``False`` ends the script early."""
Script = Callable[["Connection"], object] | Sequence[Step]


class ScriptEnded(Exception):
    """Raised inside a script to end it quietly: the server stops or the deadline passed."""


@dataclass(frozen=True)
class RawRequest:
    """One request as it arrived: the raw head (up to the blank line) and the body."""

    connection: int
    head: bytes
    body: bytes
    received_at: float  # time.monotonic() when the head was complete
    method: str = field(init=False)
    target: str = field(init=False)
    headers: dict[str, str] = field(init=False)  # names lower-cased; a repeated name: last one

    def __post_init__(self) -> None:
        lines = self.head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "target", rest.rpartition(" ")[0])
        object.__setattr__(self, "headers", headers)


class Connection:
    """The accepted socket of one connection, with deadline-bounded helpers for scripts."""

    def __init__(self, server: ScriptedServer, sock: socket.socket, index: int) -> None:
        self.server = server
        self.sock = sock
        self.index = index  # 0 for the first connection accepted, and so on
        self.deadline = time.monotonic() + server.connection_deadline
        self._buffer = b""
        self._closed = False

    def remaining(self) -> float:
        """Seconds left before the deadline; ends the script when none are."""
        if self.server.stopping:
            raise ScriptEnded("the server is stopping")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ScriptEnded("the connection's deadline passed")
        return left

    def _recv(self) -> bytes:
        """What the peer sent next; ``b""`` once it closed. A reset is the peer closing
        too: a client that closes its socket with bytes of ours still unread in its
        kernel buffer sends a RST, not a FIN."""
        self.sock.settimeout(self.remaining())
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            raise ScriptEnded("the connection's deadline passed") from None
        except ConnectionResetError:
            return b""

    def read_request(self) -> RawRequest | None:
        """Read one request (head, then a Content-Length body); ``None`` when the peer closed.

        The request is recorded in ``server.requests`` before it is returned.
        """
        while b"\r\n\r\n" not in self._buffer:
            if len(self._buffer) > _HEAD_LIMIT:
                raise ScriptEnded("request head too large")
            data = self._recv()
            if not data:
                if not self._buffer:
                    self.server._count("peer_closed")
                return None
            self._buffer += data
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        received_at = time.monotonic()
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(self._buffer) < length:
            data = self._recv()
            if not data:
                return None  # the body never came whole: not a request
            self._buffer += data
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        request = RawRequest(self.index, head + b"\r\n\r\n", body, received_at)
        self.server._record(request)
        return request

    def send(self, data: bytes) -> None:
        """Send all of ``data`` (within the deadline)."""
        self.sock.settimeout(self.remaining())
        self.sock.sendall(data)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, ending the script early if the server stops or the deadline passes."""
        if self.server._stop.wait(min(seconds, self.remaining())):
            raise ScriptEnded("the server is stopping")
        self.remaining()

    def wait(self, event: threading.Event) -> None:
        """Wait until the test sets ``event`` (bounded by the deadline and by stop())."""
        while not event.wait(min(_ACCEPT_POLL, self.remaining())):
            pass

    def trickle(self, data: bytes, interval: float) -> None:
        """Send ``data`` one byte at a time, ``interval`` seconds apart."""
        for i in range(len(data)):
            if i:
                self.sleep(interval)
            self.send(data[i : i + 1])

    def wait_for_close(self) -> bool:
        """Read and discard until the peer closes; True if it did before the deadline."""
        try:
            while self._recv():
                pass
        except ScriptEnded:
            return False
        self.server._count("peer_closed")
        return True

    def close(self) -> None:
        """Close gracefully: the peer sees end-of-file (a FIN)."""
        if not self._closed:
            self._closed = True
            self.sock.close()
            self.server._count("closed_by_script")

    def reset(self) -> None:
        """Close abortively: SO_LINGER 0 makes the kernel send a RST, not a FIN."""
        if not self._closed:
            self._closed = True
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
            self.server._count("closed_by_script")


# -- building responses ------------------------------------------------------------


def envelope(retval: object = None) -> bytes:
    """A success envelope for ``retval`` (JSON)."""
    return json.dumps({"status": "success", "retval": retval}).encode()


def response(
    status: int = 200,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] | Mapping[str, str] = (),
    *,
    content_type: str | None = "application/json",
    content_length: int | None = None,
    reason: str | None = None,
) -> bytes:
    """The bytes of an HTTP/1.1 response; ``content_length`` may lie about ``body``."""
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    names = {name.lower() for name, _ in items}
    if "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    lines += [f"{name}: {value}" for name, value in items]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- steps for list scripts ---------------------------------------------------------


def read() -> Step:
    """Read one request; the script ends if the peer closed instead."""
    return lambda conn: conn.read_request() is not None


def send(data: bytes) -> Step:
    return lambda conn: conn.send(data)


def respond(
    status: int = 200, body: bytes | None = None, headers: Sequence[tuple[str, str]] = ()
) -> Step:
    """Send a whole response (by default a success envelope with ``retval`` ``"ok"``)."""
    data = response(status, envelope("ok") if body is None else body, headers)
    return lambda conn: conn.send(data)


def sleep(seconds: float) -> Step:
    return lambda conn: conn.sleep(seconds)


def wait(event: threading.Event) -> Step:
    """Wait until the test sets ``event``."""
    return lambda conn: conn.wait(event)


def trickle(data: bytes, interval: float) -> Step:
    return lambda conn: conn.trickle(data, interval)


def close() -> Step:
    return lambda conn: conn.close()


def reset() -> Step:
    return lambda conn: conn.reset()


def serve(answer: Callable[[RawRequest], bytes] | None = None, limit: int = 10_000) -> Step:
    """Answer requests on this connection (keep-alive) until the peer closes, at most ``limit``.

    ``answer`` turns a request into the response bytes; by default a success
    envelope whose ``retval`` is the request's body as text.
    """

    def run(conn: Connection) -> bool:
        for _ in range(limit):
            request = conn.read_request()
            if request is None:
                return False
            if answer is None:
                conn.send(response(200, envelope(request.body.decode("latin-1"))))
            else:
                conn.send(answer(request))
        return True

    return run


def per_connection(*scripts: Script, then: Script | None = None) -> Callable[[Connection], None]:
    """Run ``scripts[i]`` on the i-th connection, and ``then`` (default: close) after those."""

    def run(conn: Connection) -> None:
        if conn.index < len(scripts):
            _run_script(scripts[conn.index], conn)
        elif then is not None:
            _run_script(then, conn)

    return run


def _run_script(script: Script, conn: Connection) -> None:
    if callable(script):
        script(conn)
        return
    for step in script:
        if step(conn) is False:
            return


# -- the server ------------------------------------------------------------------


class ScriptedServer:
    """Runs ``script`` on every connection accepted on 127.0.0.1; a context manager."""

    def __init__(
        self,
        script: Script,
        *,
        connection_deadline: float = 10.0,
        max_connections: int = 100,
        join_timeout: float = 5.0,
    ) -> None:
        self.script = script
        self.connection_deadline = connection_deadline
        self.max_connections = max_connections
        self.join_timeout = join_timeout
        self.requests: list[RawRequest] = []
        self.counts: dict[str, int] = {
            "connections_accepted": 0,
            "connections_rejected": 0,
            "peer_closed": 0,
            "closed_by_script": 0,
        }
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.port = 0

    # counters ---------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections_accepted(self) -> int:
        return self.counts["connections_accepted"]

    @property
    def connections_rejected(self) -> int:
        return self.counts["connections_rejected"]

    @property
    def peer_closed(self) -> int:
        return self.counts["peer_closed"]

    def _count(self, name: str) -> None:
        with self._changed:
            self.counts[name] += 1
            self._changed.notify_all()

    def _record(self, request: RawRequest) -> None:
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()

    def wait_until(self, condition: Callable[[ScriptedServer], bool], timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until ``condition(self)`` holds; return whether it does."""
        with self._changed:
            return self._changed.wait_for(lambda: condition(self), timeout)

    def bodies(self, method: str | None = None) -> list[bytes]:
        """The bodies of the requests read so far (of ``method`` only, if given)."""
        with self._lock:
            return [r.body for r in self.requests if method is None or r.method == method]

    # lifecycle --------------------------------------------------------------------

    def start(self) -> ScriptedServer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            listener.settimeout(_ACCEPT_POLL)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        thread = threading.Thread(
            target=self._accept_loop, name=f"scripted-{self.port}-accept", daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return self

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed by stop()
            with self._lock:
                index = self.counts["connections_accepted"]
                if index >= self.max_connections or self._stop.is_set():
                    self.counts["connections_rejected"] += 1
                    reject = True
                else:
                    self.counts["connections_accepted"] += 1
                    self._sockets.append(sock)
                    reject = False
            if reject:
                sock.close()
                continue
            thread = threading.Thread(
                target=self._run, args=(sock, index), name=f"scripted-{self.port}-{index}",
                daemon=True,
            )  # fmt: skip
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket, index: int) -> None:
        conn = Connection(self, sock, index)
        try:
            _run_script(self.script, conn)
        except (ScriptEnded, OSError):
            pass  # the client went away, the deadline passed or the server stops
        except BaseException as exc:
            with self._lock:
                self.errors.append(exc)
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop accepting, wake and join every thread (bounded), close every socket.

        Raises :class:`RuntimeError` when a thread is still alive after
        ``join_timeout`` or a script raised something other than a socket error.
        """
        self._stop.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in a script
        deadline = time.monotonic() + self.join_timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            with self._lock:
                done = len(self._threads) == len(threads)
            if done:
                break
        stuck = [t.name for t in threads if t.is_alive()]
        if self._listener is not None:
            self._listener.close()
        for sock in sockets:
            sock.close()
        if stuck:
            raise RuntimeError(f"threads still running after {self.join_timeout}s: {stuck}")
        if self.errors:
            raise RuntimeError(f"a script failed: {self.errors[0]!r}") from self.errors[0]

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.stop()
            return
        with contextlib.suppress(RuntimeError):  # the test's own failure says more
            self.stop()
