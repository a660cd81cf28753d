"""A real HTTPS server for the TLS tests: a trustme CA, threaded, on 127.0.0.1, no mocks.

The server counts TCP connections, completed handshakes and requests, so pooling
and "not retried" are asserted on counters. Every socket is closed and every wait
is bounded (the suite runs with ``filterwarnings = error``, so a leaked socket's
ResourceWarning would fail the test). Used by the TLS cases of
``tests/test_async_faults.py``, which run against both drivers.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import trustme

__all__ = [
    "IDLE_TIMEOUT",
    "SLEEP",
    "Pems",
    "Server",
    "https_server",
    "server_context",
    "write_pems",
]

#: Seconds a server-side connection may sit idle, and the server thread may take to stop.
IDLE_TIMEOUT = 5.0
#: Seconds ``GET /sleep`` waits before it answers.
SLEEP = 2.0


class _Handler(BaseHTTPRequestHandler):
    """Answers every GET and POST with a success envelope echoing the arguments."""

    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = IDLE_TIMEOUT
    # Headers and body leave in one write (flushed after each request), not two
    # segments that wait on the client's delayed ACK.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server: _HTTPSServer

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/sleep":  # answers too late for a short deadline
            time.sleep(SLEEP)
        self._answer(dict(parse_qsl(urlsplit(self.path).query)))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._answer(dict(parse_qsl(self.rfile.read(length).decode("utf-8"))))

    def _answer(self, args: dict[str, str]) -> None:
        self.server.count("requests")
        retval = {"method": self.command, "path": urlsplit(self.path).path, "args": args}
        body = json.dumps({"status": "success", "retval": retval}).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def finish(self) -> None:
        # Closing wfile raises when the client has gone (its flush fails), and the
        # standard finish() then leaves rfile open: the TLS socket it refers to would
        # stay half-closed until collected (a ResourceWarning in some later test).
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.rfile.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean


class _HTTPSServer(ThreadingHTTPServer):
    """A threaded HTTPS server; the TLS handshake runs in the connection's own thread."""

    daemon_threads = False
    block_on_close = True  # server_close() joins the connection threads

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.timeout = 0.05  # handle_request() polls, so the serving loop can stop
        self.context = context
        self.lock = threading.Lock()
        self.counters = {"connections": 0, "handshakes": 0, "requests": 0}
        self.errors: list[BaseException] = []
        self.live: set[ssl.SSLSocket] = set()

    def count(self, name: str) -> None:
        with self.lock:
            self.counters[name] += 1

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.count("connections")
        request.settimeout(IDLE_TIMEOUT)
        try:
            # wrap_socket detaches `request`; the TLS socket is ours to close.
            with self.context.wrap_socket(request, server_side=True) as tls:
                self.count("handshakes")
                with self.lock:
                    self.live.add(tls)
                try:
                    _Handler(tls, client_address, self)
                finally:
                    with self.lock:
                        self.live.discard(tls)
        except Exception as exc:  # a failed handshake or a dropped connection
            with self.lock:
                self.errors.append(exc)

    def hang_up(self) -> None:
        """Unblock connection threads still waiting on an idle keep-alive connection."""
        with self.lock:
            live = list(self.live)
        for tls in live:
            with contextlib.suppress(OSError):
                # The plain-socket shutdown, so the SSL object stays the reader thread's.
                socket.socket.shutdown(tls, socket.SHUT_RDWR)


@dataclass
class Server:
    url: str
    httpd: _HTTPSServer

    def stat(self, name: str) -> int:
        with self.httpd.lock:
            return self.httpd.counters[name]


@contextlib.contextmanager
def https_server(context: ssl.SSLContext) -> Iterator[Server]:
    httpd = _HTTPSServer(context)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            httpd.handle_request()

    thread = threading.Thread(target=serve, name="https-test-server")
    thread.start()
    try:
        yield Server(f"https://127.0.0.1:{httpd.server_address[1]}", httpd)
    finally:
        stop.set()
        thread.join(IDLE_TIMEOUT)
        httpd.hang_up()
        httpd.server_close()
        assert not thread.is_alive(), "the HTTPS test server did not stop"


def server_context(ca: trustme.CA, *, require_client_cert: bool = False) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 (and asking for a client's)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


@dataclass
class Pems:
    """PEM files a client is given: the CA, and a client certificate in one file or two."""

    ca: str
    client: str  # key and certificate chain in one file
    client_cert: str
    client_key: str


def write_pems(ca: trustme.CA, directory: Path) -> Pems:
    client = ca.issue_cert("client.example.org")
    files = Pems(
        ca=str(directory / "ca.pem"),
        client=str(directory / "client.pem"),
        client_cert=str(directory / "client-cert.pem"),
        client_key=str(directory / "client-key.pem"),
    )
    ca.cert_pem.write_to_path(files.ca)
    client.private_key_and_cert_chain_pem.write_to_path(files.client)
    client.cert_chain_pems[0].write_to_path(files.client_cert)
    client.private_key_pem.write_to_path(files.client_key)
    return files
