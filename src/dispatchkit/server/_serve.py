"""A small threaded HTTP/1.1 server that keeps connections alive, for any WSGI app.

``wsgiref`` closes the connection after every response, which defeats the
connection pooling a dispatcher relies on. This server is the standard
library's :class:`~http.server.ThreadingHTTPServer` with a request handler that
speaks HTTP/1.1 keep-alive and runs a WSGI application, so serving tasks needs
no extra dependency.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from dispatchkit._checks import count, seconds
from dispatchkit.server._handler import WSGIRequestHandler

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

__all__ = ["BACKLOG", "ServerStats", "TaskServer"]

logger = logging.getLogger("dispatchkit.server")

_POLL_INTERVAL = 0.1  # how quickly stop() is noticed by the accept loop
#: The largest ``backlog``: ``listen()`` takes a C int, and kernels cap it far lower.
MAX_BACKLOG = 65535
#: Connections the kernel may queue for the accept loop (``listen()``'s backlog);
#: the kernel caps it (``net.core.somaxconn`` on Linux: 4096 by default since 5.4).
BACKLOG = 1024


class ServerStats:
    """Counters of a :class:`TaskServer`, safe to read and reset from any thread.

    ``connections_opened`` counts accepted sockets; ``requests_served`` counts
    requests handed to the app, before the answer is written (so a client that
    has its answer sees it counted); a malformed request line is not counted.
    """

    __slots__ = ("_connections_opened", "_lock", "_requests_served")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections_opened = 0
        self._requests_served = 0

    @property
    def connections_opened(self) -> int:
        return self._connections_opened

    @property
    def requests_served(self) -> int:
        return self._requests_served

    def reset(self) -> None:
        """Set both counters back to zero."""
        with self._lock:
            self._connections_opened = 0
            self._requests_served = 0

    def _count_connection(self) -> None:
        with self._lock:
            self._connections_opened += 1

    def _count_request(self) -> None:
        with self._lock:
            self._requests_served += 1

    def __repr__(self) -> str:
        return (
            f"ServerStats(connections_opened={self._connections_opened}, "
            f"requests_served={self._requests_served})"
        )


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        app: WSGIApplication,
        idle_timeout: float,
        request_timeout: float,
        backlog: int,
        stats: ServerStats,
    ) -> None:
        self.app = app
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        # socketserver listens with request_queue_size (5 by default): a burst of
        # clients beyond it sits in SYN retries, a second or more each
        self.request_queue_size = backlog
        self.stats = stats
        self._connections: set[socket.socket] = set()
        self._changed = threading.Condition()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, WSGIRequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, a DNS query we do not need
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._changed:
            self._connections.add(request)
        self.stats._count_connection()
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._changed:
            self._connections.discard(request)
            self._changed.notify_all()
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self, timeout: float) -> None:
        """Stop reading on every open connection and wait (bounded) until all are closed.

        Only the read side is shut, so a request in progress still gets its
        answer; an idle connection sees end-of-file and closes at once.
        """
        with self._changed:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RD)
            self._changed.wait_for(lambda: not self._connections, timeout)


class TaskServer:
    """Serves a WSGI app (usually a :class:`TaskApp`) over HTTP/1.1 with keep-alive.

    One daemon thread per connection. Every wait for the client is bounded by
    ``idle_timeout`` seconds (an idle connection is closed after it), and a
    request's head and body must arrive within ``request_timeout`` seconds of
    its first byte, however steadily they trickle in: past it the request is
    answered 408 and the connection closed. The socket listens with a queue of
    ``backlog`` connections. Nothing listens until :meth:`listen`,
    :meth:`start` or :meth:`serve_forever`; as a context manager it starts and
    stops.
    """

    def __init__(
        self,
        app: WSGIApplication,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout: float = 30.0,
        *,
        request_timeout: float = 30.0,
        backlog: int = BACKLOG,
    ) -> None:
        seconds(idle_timeout, "idle_timeout")
        seconds(request_timeout, "request_timeout")
        count(backlog, "backlog", maximum=MAX_BACKLOG)
        self.app = app
        self.host = host
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.backlog = backlog
        self.stats = ServerStats()
        self._port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._serving = False
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The requested port until listening, then the bound one (kept across stop and start)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``, without a trailing slash."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def listen(self) -> TaskServer:
        """Bind and listen, if not yet done; return self."""
        with self._lock:
            self._listen()
        return self

    def _listen(self) -> _HTTPServer:
        if self._httpd is None:
            self._httpd = _HTTPServer(
                (self.host, self._port),
                self.app,
                self.idle_timeout,
                self.request_timeout,
                self.backlog,
                self.stats,
            )
            # port 0 picked a free port; a restart reuses it, so the URL stays valid
            self._port = self._httpd.server_port
        return self._httpd

    def _claim(self) -> _HTTPServer:
        with self._lock:
            if self._serving:
                raise RuntimeError("the server is already running")
            self._serving = True
            return self._listen()

    def start(self) -> TaskServer:
        """Serve in a daemon thread; return self once the socket is listening."""
        httpd = self._claim()
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"dispatchkit-server-{self.port}",
            daemon=True,
        )
        try:
            self._thread.start()
        except BaseException:
            # No serve loop will run: shutdown() would wait for it forever.
            with self._lock:
                self._serving = False
            self.stop()
            raise
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop` is called from another one."""
        httpd = self._claim()
        try:
            httpd.serve_forever(poll_interval=_POLL_INTERVAL)
        finally:
            self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the listening socket and the open connections.

        Waits at most about ``timeout`` seconds for connections to finish and
        for the serving thread to end. Safe to call more than once.
        """
        with self._lock:
            httpd, thread, serving = self._httpd, self._thread, self._serving
            self._httpd, self._thread, self._serving = None, None, False
        if httpd is None:
            return
        if serving:
            httpd.shutdown()
        httpd.server_close()
        httpd.close_connections(timeout)
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> TaskServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TaskServer({self.url!r}, {self.stats!r})"
