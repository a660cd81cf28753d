"""Real proxies for the proxy tests, as subprocesses on 127.0.0.1, and a target that echoes.

* :func:`http_proxy` runs proxy.py (forwarding, ``CONNECT``, basic auth, and TLS
  to its clients when given a certificate) on a port the kernel picks; its access
  log (one line per client connection, written when the connection closes) tells
  which targets it reached.
* :func:`socks_proxy` runs pproxy as a SOCKS5 server with a user and password;
  ``-v`` makes it print ``socks5 <client> -> <target>`` per connection.
* :func:`echo_server` answers every GET with what it received (the request
  target and the headers), over http or https, and counts its connections;
  ``/sleep`` answers only after ``SLEEP`` seconds.

No mocks: the tests talk to these over real sockets. Each proxy runs in a
session of its own under a small launcher that ends the whole process group
when its stdin closes, so it cannot outlive the test process; stopping it is
bounded (stdin closed, then SIGKILL to the group). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

__all__ = ["EchoServer", "ProxyProcess", "echo_server", "http_proxy", "socks_proxy"]

#: Seconds a proxy may take to start, and to stop.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
#: Seconds a server-side connection may sit idle.
IDLE_TIMEOUT = 5.0
#: Seconds the echo server takes to answer ``/sleep``.
SLEEP = 2.0

# Runs ``python -m <argv[1]> <argv[2:]>`` and ends its process group once stdin closes.
_LAUNCHER = """\
import os, runpy, signal, sys, threading

def watch():
    while os.read(0, 4096):  # the raw fd: no buffer lock held at exit
        pass
    os.killpg(0, signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@dataclass
class ProxyProcess:
    """A running proxy: where it listens, and what it has written so far."""

    scheme: str
    port: int
    credentials: str | None
    log_path: Path | None = None  # proxy.py's log file
    lines: list[str] = field(default_factory=list)  # pproxy's stdout

    def url(self, credentials: str | None = "") -> str:
        """The proxy's URL with its own credentials (``""``), others, or none (``None``)."""
        userinfo = self.credentials if credentials == "" else credentials
        at = f"{userinfo}@" if userinfo else ""
        return f"{self.scheme}://{at}127.0.0.1:{self.port}"

    def output(self) -> str:
        log = self.log_path
        text = "" if log is None else log.read_text(encoding="utf-8", errors="replace")
        return text + "".join(self.lines)

    def wait_for(self, needle: str, seen: int = 0, timeout: float = 5.0) -> None:
        """Wait (bounded) until ``needle`` is in the proxy's output more than ``seen`` times."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.output()
            found = text.count(needle)
            if found > seen or time.monotonic() > deadline:
                assert found > seen, f"{needle!r} not in the proxy's output:\n{text[-3000:]}"
                return
            time.sleep(0.02)


def _start(
    args: list[str], stdout: IO[bytes] | int, home: str | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-u", "-c", _LAUNCHER, *args],
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, which the launcher (or we) end
        env=None if home is None else {**os.environ, "HOME": home},
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the launcher ends the group
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def http_proxy(
    credentials: str | None = None, tls: tuple[str, str] | None = None
) -> Iterator[ProxyProcess]:
    """Run proxy.py; ``credentials`` (``user:password``) turns basic auth on, ``tls``
    (certificate, key files) makes it an ``https://`` proxy."""
    with tempfile.TemporaryDirectory(prefix="dk-proxy-") as directory:
        port_file, log = Path(directory, "port"), Path(directory, "proxy.log")
        args = ["proxy", "--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
        args += ["--num-acceptors", "1", "--threaded", "--log-file", str(log)]
        args += ["--log-level", "INFO", "--timeout", str(int(IDLE_TIMEOUT))]
        if credentials is not None:
            args += ["--basic-auth", credentials]
        if tls is not None:
            args += ["--cert-file", tls[0], "--key-file", tls[1]]
        log.touch()
        output = Path(directory, "output")
        with output.open("wb") as file:
            proc = _start(args, file, home=directory)  # proxy.py makes ~/.proxy on import
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not port_file.is_file() or not port_file.read_text().strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    what = f"exited ({proc.returncode})" if proc.poll() is not None else "is slow"
                    text = output.read_text() + log.read_text()
                    raise RuntimeError(f"proxy.py {what}:\n{text[-3000:]}")
                time.sleep(0.02)
            port = int(port_file.read_text().split()[0])
            yield ProxyProcess("https" if tls else "http", port, credentials, log_path=log)
        finally:
            _stop(proc)


_SERVING = re.compile(r"Serving on .*:(\d+) by")


@contextlib.contextmanager
def socks_proxy(credentials: str) -> Iterator[ProxyProcess]:
    """Run pproxy as a SOCKS5 server that asks for ``credentials`` (``user:password``).

    ``--auth 0``: pproxy otherwise lets a client address in unasked for 30 days
    once it has authenticated, and a wrong password would pass.
    """
    args = ["pproxy", "--auth", "0", "-v", "-l", f"socks5://127.0.0.1:0#{credentials}"]
    proc = _start(args, subprocess.PIPE)
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for raw in stdout:  # until the process ends
            lines.append(raw.decode("utf-8", "replace"))
            ready.set()
        ready.set()

    reader = threading.Thread(target=read, name="pproxy-stdout", daemon=True)
    reader.start()
    try:
        if not ready.wait(START_TIMEOUT) or not (found := _SERVING.search("".join(lines))):
            raise RuntimeError(f"pproxy did not start: {''.join(lines)[-3000:]!r}")
        yield ProxyProcess("socks5h", int(found[1]), credentials, lines=lines)
    finally:
        _stop(proc)
        reader.join(STOP_TIMEOUT)
        stdout.close()


class _Echo(BaseHTTPRequestHandler):
    """Answers every GET with a success envelope: the request target and the headers."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server: _EchoHTTPServer

    def do_GET(self) -> None:
        if self.path.startswith("/sleep"):  # answer late: a deadline must cut the attempt
            time.sleep(SLEEP)
        headers = {name.lower(): value for name, value in self.headers.items()}
        retval = {"target": self.path, "headers": headers}
        body = json.dumps({"status": "success", "retval": retval}).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _EchoHTTPServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins the connection threads

    def __init__(self, context: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.timeout = 0.05  # handle_request() polls, so the serving loop can stop
        self.context = context
        self.lock = threading.Lock()
        self.connections = 0
        self.live: set[socket.socket] = set()

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections += 1
        request.settimeout(IDLE_TIMEOUT)
        try:
            if self.context is not None:
                request = self.context.wrap_socket(request, server_side=True)
            with request:
                with self.lock:
                    self.live.add(request)
                try:
                    _Echo(request, client_address, self)
                finally:
                    with self.lock:
                        self.live.discard(request)
        except (OSError, ValueError):
            pass  # a failed handshake (a wrong CA on the client's side) or a dropped connection

    def hang_up(self) -> None:
        """Unblock connection threads still waiting on an idle keep-alive connection."""
        with self.lock:
            live = list(self.live)
        for sock in live:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


@dataclass
class EchoServer:
    url: str
    port: int
    httpd: _EchoHTTPServer

    @property
    def connections(self) -> int:
        with self.httpd.lock:
            return self.httpd.connections


@contextlib.contextmanager
def echo_server(context: ssl.SSLContext | None = None) -> Iterator[EchoServer]:
    """An echo target on 127.0.0.1, https with ``context``."""
    httpd = _EchoHTTPServer(context)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            httpd.handle_request()

    thread = threading.Thread(target=serve, name="echo-server")
    thread.start()
    port = httpd.server_address[1]
    scheme = "http" if context is None else "https"
    try:
        yield EchoServer(f"{scheme}://127.0.0.1:{port}", port, httpd)
    finally:
        stop.set()
        thread.join(IDLE_TIMEOUT)
        httpd.hang_up()
        httpd.server_close()
        assert not thread.is_alive(), "the echo server did not stop"
