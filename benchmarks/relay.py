"""A TCP relay that adds round-trip time in user space, for kernels without ``netem``.

::

    python -m benchmarks.relay --rtt-ms 10 --listen-host H --upstream HOST:PORT [...]

Listens on one port per ``--upstream`` and prints ``LISTENING <port> ...``;
stops when its stdin closes. Every byte is held back half the RTT in each
direction, and the first bytes a client sends on a new connection one RTT
more: that is the TCP handshake, which the kernel here completes at once on
``connect()``. So a new connection costs the client one RTT before its first
request, as over a real link, and TLS handshakes pay their round trips.

Each direction of a connection has a reader thread, which stamps chunks with
their due time as they arrive, and a writer thread, which sends them when due
(``time.sleep`` is precise to tens of µs, where asyncio's timers round to
milliseconds). Order is kept: a chunk is never due before the one ahead of it.
"""

from __future__ import annotations

import argparse
import queue
import socket
import sys
import threading
import time

_EOF = b""


def pipe(
    src: socket.socket,
    dst: socket.socket,
    delay: float,
    first_extra: float,
    finished: threading.Semaphore,
) -> None:
    """Copy ``src`` to ``dst``, each chunk ``delay`` seconds after it arrived."""
    chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def read() -> None:
        last = 0.0
        extra = first_extra
        while True:
            try:
                data = src.recv(262144)
            except OSError:
                data = _EOF
            last = max(time.perf_counter() + delay + extra, last)
            extra = 0.0
            chunks.put((last, data))
            if not data:
                return

    def write() -> None:
        while True:
            due, data = chunks.get()
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    break
                dst.sendall(data)
            except OSError:
                src.close()  # the peer is gone: unblock the reader
                break
        if not finished.acquire(blocking=False):  # the other direction is done too
            src.close()
            dst.close()

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=write, daemon=True).start()


def accept_loop(listener: socket.socket, upstream: tuple[str, int], rtt: float) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return  # closed: shutting down
        try:
            server = socket.create_connection(upstream, timeout=10)
        except OSError:
            client.close()
            continue
        server.settimeout(None)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Whichever direction finishes second closes both sockets.
        finished = threading.Semaphore(1)
        pipe(client, server, rtt / 2, rtt, finished)
        pipe(server, client, rtt / 2, 0.0, finished)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--rtt-ms", type=float, required=True)
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--upstream", action="append", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    ports = []
    for target in args.upstream:
        host, _, port = target.rpartition(":")
        listener = socket.create_server((args.listen_host, 0), backlog=1024)
        ports.append(str(listener.getsockname()[1]))
        threading.Thread(
            target=accept_loop,
            args=(listener, (host, int(port)), args.rtt_ms / 1000),
            daemon=True,
        ).start()
    print("LISTENING", *ports, flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
