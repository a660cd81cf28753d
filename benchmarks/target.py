"""The target: a minimal, fast keep-alive HTTP/1.1 server answering one success envelope.

It runs in its own process (or processes) so that the clients under test keep
their CPU::

    python -m benchmarks.target [--host H] [--port P] [--tls-port P --cert PEM --key PEM]
                                [--workers N]

Once bound it prints ``LISTENING http://H:P [https://H:P]`` and it stops when
its stdin closes, so it never outlives the benchmark. ``GET /stats`` answers
``{"connections": N, "requests": M}``: connections accepted and requests
answered since start, over every worker and both schemes; the suite reads it
to count the connections each client opens. Only enough HTTP is parsed
(request line, headers, Content-Length) to be a correct peer for keep-alive
clients, pipelining and ``Connection: close``; this is not a general server.

``GET /delay/<ms>/<anything>`` answers the same envelope ``<ms>``
milliseconds after the request arrived (at most 10 s), like a task that waits
on something else: the answer waits in a timer heap of the same thread, so a
thousand delayed requests hold a thousand entries in a list, not a thousand
threads. Answers on one connection still leave in the order of the requests.

Every connection is served by one thread with ``selectors`` (see
:class:`Server` for why not threads or asyncio). ``--workers N`` forks N
processes sharing the listening sockets, their counters in shared memory; one
is enough on a two-core machine, where the client and the server have a core
each.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import mmap
import os
import selectors
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

BODY = b'{"status":"success","retval":100}'
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
RESPONSE = HEAD % len(BODY) + b"\r\n" + BODY
CLOSE_RESPONSE = HEAD % len(BODY) + b"Connection: close\r\n\r\n" + BODY
SLOT = struct.Struct("QQ")  # connections, requests: one slot per worker in shared memory
DELAY_PREFIX = b"get /delay/"
MAX_DELAY_MS = 10_000


class Counters:
    """Per-worker counters in anonymous shared memory, summed by ``/stats``."""

    def __init__(self, workers: int) -> None:
        self.memory = mmap.mmap(-1, SLOT.size * workers)
        self.workers = workers
        self.slot = 0
        self.connections = self.requests = 0

    def publish(self) -> None:
        SLOT.pack_into(self.memory, self.slot * SLOT.size, self.connections, self.requests)

    def total(self) -> tuple[int, int]:
        self.publish()
        connections = requests = 0
        for i in range(self.workers):
            c, r = SLOT.unpack_from(self.memory, i * SLOT.size)
            connections += c
            requests += r
        return connections, requests


def answer(buffer: bytes, counters: Counters) -> tuple[list[tuple[float, bytes]], bytes, bool]:
    """The responses to every complete request in ``buffer``, the rest, and whether to close.

    Each response comes with its delay in seconds (0.0 but for ``/delay/<ms>/``).
    """
    out: list[tuple[float, bytes]] = []
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return out, buffer, False
        head = buffer[:end].lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else None])
        if len(buffer) < end + 4 + length:
            return out, buffer, False
        buffer = buffer[end + 4 + length :]
        counters.requests += 1
        if head.startswith(b"get /stats"):
            connections, requests = counters.total()
            body = b'{"connections":%d,"requests":%d}' % (connections, requests)
            out.append((0.0, HEAD % len(body) + b"\r\n" + body))
        elif b"\r\nconnection: close" in head:
            out.append((_delay(head), CLOSE_RESPONSE))
            return out, b"", True
        else:
            out.append((_delay(head), RESPONSE))


def _delay(head: bytes) -> float:
    """Seconds to hold the answer: ``<ms>`` of ``GET /delay/<ms>/...``, else 0."""
    if not head.startswith(DELAY_PREFIX):
        return 0.0
    start = len(DELAY_PREFIX)
    stop = head.find(b"/", start)
    digits = head[start : stop if stop >= 0 else None]
    if not digits.isdigit():
        raise ValueError(f"bad delay {digits[:20]!r}")
    return min(int(digits), MAX_DELAY_MS) / 1000


class Connection:
    """One client connection's state: TLS handshake, unparsed input, unsent output.

    ``held`` are answers not due yet (due time, bytes), in request order; an
    answer behind a held one waits for it.
    """

    __slots__ = ("buffer", "closed", "closing", "handshaking", "held", "outgoing", "sock")

    def __init__(self, sock: socket.socket, tls: bool) -> None:
        self.sock = sock
        self.handshaking = tls
        self.buffer = b""
        self.outgoing = b""
        self.closing = False
        self.closed = False
        self.held: deque[tuple[float, bytes]] = deque()


class Server:
    """Every connection on one thread, with ``selectors``: all clients are served alike.

    (A thread per connection made each client's speed depend on where the
    scheduler put *its* server thread; asyncio's TLS layer stalled 40 ms on
    some new connections.) TLS sockets are read until ``SSLWantReadError``,
    because decrypted bytes can wait inside the SSL object with nothing left
    on the socket for ``select`` to see.
    """

    def __init__(
        self, listeners: list[tuple[socket.socket, ssl.SSLContext | None]], counters: Counters
    ) -> None:
        self.selector = selectors.DefaultSelector()
        self.counters = counters
        #: Held answers' due times: (due, tie-breaker, connection), earliest first.
        self.timers: list[tuple[float, int, Connection]] = []
        self._order = itertools.count()
        for listener, context in listeners:
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, context)

    def run(self, running: Callable[[], bool]) -> None:
        timers = self.timers
        while running():
            wait = 0.5
            if timers:
                wait = min(wait, max(timers[0][0] - time.monotonic(), 0.0))
            for key, events in self.selector.select(wait):
                if isinstance(key.data, Connection):
                    self._serve(key.data, events)
                else:
                    assert isinstance(key.fileobj, socket.socket)
                    self._accept(key.fileobj, key.data)
            if timers and timers[0][0] <= time.monotonic():
                self._release()

    def _release(self) -> None:
        """Send every held answer that is due, in each connection's order."""
        now = time.monotonic()
        timers = self.timers
        while timers and timers[0][0] <= now:
            conn = heapq.heappop(timers)[2]
            if conn.closed or not conn.held:
                continue
            try:
                if self._unhold(conn, now):
                    self._write(conn)
            except (OSError, ValueError):
                conn.closing, conn.outgoing = True, b""
            self._settle(conn)

    def _unhold(self, conn: Connection, now: float) -> bool:
        """Move the due answers at the head of ``conn.held`` to its output; any moved?"""
        held, moved = conn.held, False
        while held and held[0][0] <= now:
            conn.outgoing += held.popleft()[1]
            moved = True
        return moved

    def _queue(self, conn: Connection, out: list[tuple[float, bytes]]) -> None:
        """Answers to send now, or to hold until due behind any held one."""
        now = time.monotonic()
        for delay, response in out:
            if delay <= 0.0 and not conn.held:
                conn.outgoing += response
                continue
            due = now + delay
            if conn.held and conn.held[-1][0] > due:
                due = conn.held[-1][0]  # never ahead of an earlier request's answer
            conn.held.append((due, response))
            heapq.heappush(self.timers, (due, next(self._order), conn))

    def _accept(self, listener: socket.socket, context: ssl.SSLContext | None) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker took it
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self.counters.connections += 1
        self.counters.publish()
        conn = Connection(sock, context is not None)
        self.selector.register(sock, selectors.EVENT_READ, conn)
        if conn.handshaking:
            self._serve(conn, selectors.EVENT_READ)

    def _serve(self, conn: Connection, events: int) -> None:
        try:
            if conn.handshaking and not self._handshake(conn):
                return
            if events & selectors.EVENT_READ:
                self._read(conn)
            if conn.outgoing:
                self._write(conn)
        except (OSError, ValueError):
            conn.closing, conn.outgoing = True, b""  # gone, or sent what we do not parse
            conn.held.clear()
        self._settle(conn)

    def _settle(self, conn: Connection) -> None:
        """Close ``conn`` once it is closing with nothing left to send; else mind its events."""
        if conn.closing and not conn.outgoing and not conn.held:
            if conn.sock in self.selector.get_map():
                self.selector.unregister(conn.sock)
            conn.sock.close()
            conn.closed = True
            return
        if conn.closing and not conn.outgoing:
            wanted = 0  # only held answers are left: read nothing more, wait for the timer
        else:
            wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outgoing else 0)
        key = self.selector.get_map().get(conn.sock)
        events = key.events if key is not None else 0
        if events == wanted:
            return
        if not wanted:
            self.selector.unregister(conn.sock)
        elif not events:
            self.selector.register(conn.sock, wanted, conn)
        else:
            self.selector.modify(conn.sock, wanted, conn)

    def _handshake(self, conn: Connection) -> bool:
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLWantWriteError:
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            return False
        conn.handshaking = False
        return True

    def _read(self, conn: Connection) -> None:
        while not conn.closing:
            try:
                data = conn.sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            except ssl.SSLWantWriteError:
                return
            if not data:
                conn.closing = True
                conn.held.clear()  # the client is gone: nothing held is wanted any more
                return
            out, conn.buffer, close = answer(conn.buffer + data, self.counters)
            if out:
                self.counters.publish()
                self._queue(conn, out)
                if conn.outgoing:
                    self._write(conn)
            conn.closing = close

    def _write(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outgoing)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return
        conn.outgoing = conn.outgoing[sent:]


def serve(
    listeners: list[tuple[socket.socket, ssl.SSLContext | None]],
    counters: Counters,
    running: Callable[[], bool],
) -> None:
    Server(listeners, counters).run(running)


def run_forked(
    listeners: list[tuple[socket.socket, ssl.SSLContext | None]], counters: Counters, workers: int
) -> None:
    """Fork ``workers`` servers sharing the sockets; stop them all when stdin closes."""
    parent = os.getpid()
    children: list[int] = []
    for slot in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                counters.slot = slot
                signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
                serve(listeners, counters, lambda: os.getppid() == parent)
            finally:
                os._exit(0)
        children.append(pid)
    try:
        sys.stdin.read()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            deadline = time.monotonic() + 5
            while not os.waitpid(pid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.02)


def wait_for_eof(stdin_open: threading.Event) -> None:
    sys.stdin.read()
    stdin_open.clear()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-port", type=int, default=None, help="also serve HTTPS here")
    parser.add_argument("--cert", help="PEM certificate chain for HTTPS")
    parser.add_argument("--key", help="PEM private key for HTTPS")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    counters = Counters(max(args.workers, 1))
    listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = [
        (socket.create_server((args.host, args.port), backlog=1024), None)
    ]
    if args.tls_port is not None:
        if not args.cert:
            parser.error("--tls-port needs --cert (and --key unless the PEM holds it)")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        listeners.append((socket.create_server((args.host, args.tls_port), backlog=1024), context))
    urls = [
        f"{'https' if context else 'http'}://{args.host}:{sock.getsockname()[1]}"
        for sock, context in listeners
    ]
    print("LISTENING", *urls, flush=True)
    if args.workers > 1:
        run_forked(listeners, counters, args.workers)
    else:
        stdin_open = threading.Event()
        stdin_open.set()
        threading.Thread(target=wait_for_eof, args=(stdin_open,), daemon=True).start()
        serve(listeners, counters, stdin_open.is_set)


if __name__ == "__main__":
    main()
