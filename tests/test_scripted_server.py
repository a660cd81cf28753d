"""The scripted test server itself: what its counters count."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from support.scripted_server import Connection, ScriptedServer

WAIT = 5.0


def answer_then_wait_for_close(conn: Connection) -> None:
    if conn.read_request() is not None:
        conn.send(b"x" * 4096)  # never read whole by the client below
        conn.wait_for_close()


def answer_then_read_the_next_request(conn: Connection) -> None:
    if conn.read_request() is not None:
        conn.send(b"x" * 4096)
        assert conn.read_request() is None


@pytest.mark.parametrize("script", [answer_then_wait_for_close, answer_then_read_the_next_request])
def test_a_client_that_closes_with_bytes_unread_is_a_peer_close(
    script: Callable[[Connection], None],
) -> None:
    # Closing a socket with received bytes unread sends a RST, not a FIN: the server
    # sees a reset, and the client closed its end all the same.
    with ScriptedServer(script) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert server.wait_until(lambda s: len(s.requests) == 1, WAIT)
            assert client.recv(1)  # the answer arrived; the rest stays unread
        assert server.wait_until(lambda s: s.peer_closed == 1, WAIT), server.counts
