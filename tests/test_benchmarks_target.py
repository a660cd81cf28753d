"""The benchmark's own target server and memory probe measure what they say.

The delayed endpoint (``/delay/<ms>/...``) holds answers on the server's one
thread, keeping each connection's answers in request order; the memory probe
reads this process image's peak RSS, not the one Linux carries across
``execve`` from the parent. Nothing here asserts a duration.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def target() -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.target"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "LISTENING", line
        host, _, port = line[1].removeprefix("http://").rpartition(":")
        yield host, int(port)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def _answers(sock: socket.socket, count: int) -> list[bytes]:
    """The bodies of the next ``count`` answers (the target's are small, Content-Length framed)."""
    buffer = b""
    bodies: list[bytes] = []
    while len(bodies) < count:
        chunk = sock.recv(65536)
        assert chunk, "the target closed the connection"
        buffer += chunk
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head = buffer[:end].lower()
            at = head.index(b"content-length:") + len(b"content-length:")
            length = int(head[at:].split(b"\r\n")[0])
            if len(buffer) < end + 4 + length:
                break
            bodies.append(buffer[end + 4 : end + 4 + length])
            buffer = buffer[end + 4 + length :]
    return bodies


def test_delayed_answers_keep_request_order(target: tuple[str, int]) -> None:
    with socket.create_connection(target, timeout=10) as sock:
        # Pipelined: a held answer, then one the server could send at once; it must wait.
        sock.sendall(
            b"GET /delay/30/multiply?x=10&y=10 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /stats HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /multiply HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        first, stats, last = _answers(sock, 3)
    assert first == b'{"status":"success","retval":100}'
    assert stats.startswith(b'{"connections":1,')
    assert last == first


def test_many_delayed_requests_on_one_thread(target: tuple[str, int]) -> None:
    socks = [socket.create_connection(target, timeout=10) for _ in range(200)]
    try:
        for sock in socks:
            sock.sendall(b"GET /delay/20/multiply HTTP/1.1\r\nHost: t\r\n\r\n")
        assert all(_answers(sock, 1) == [b'{"status":"success","retval":100}'] for sock in socks)
    finally:
        for sock in socks:
            sock.close()


def test_a_bad_delay_closes_only_that_connection(target: tuple[str, int]) -> None:
    with socket.create_connection(target, timeout=10) as bad:
        bad.sendall(b"GET /delay/soon/multiply HTTP/1.1\r\nHost: t\r\n\r\n")
        assert bad.recv(65536) == b""
    with socket.create_connection(target, timeout=10) as good:
        good.sendall(b"GET /multiply HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _answers(good, 1) == [b'{"status":"success","retval":100}']


def test_memory_probe_reads_its_own_peak_not_its_parents() -> None:
    """``ru_maxrss`` survives ``execve``: a child of a big parent would report the parent's."""
    big = bytearray(256 * 1024 * 1024)
    for at in range(0, len(big), 4096):  # touched, so it is resident
        big[at] = 1
    code = "from benchmarks.memory import peak_rss_kib; print(peak_rss_kib())"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    del big
    assert done.returncode == 0, done.stderr
    assert 0 < int(done.stdout) < 128 * 1024, "the probe reported its parent's peak RSS"
