"""What a hostile (or merely odd) server, or a careless caller, can do to the sync
Dispatcher alone, and what it does.

A pool that runs dry (threads waiting on urllib3's pool), a task id that cannot
be a header, numbers JSON cannot carry, and urllib3's HTTP/2 switch. The cases
both drivers share (interim answers, an unasked 101, headers that cannot be
sent, compression bombs) are in ``tests/test_async_faults.py``. Every server is
a real socket on 127.0.0.1 (``support.scripted_server``); each case and its
outcome is listed in docs/reliability.md.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import pytest

from dispatchkit import DispatchTimeout, EncodeError, TransportError, UsageError
from support.scripted_server import RawRequest, ScriptedServer, envelope, response, serve

# -- a pool that runs dry -------------------------------------------------------------


def test_a_pool_timeout_does_not_break_the_call_holding_the_connection(
    make_dispatcher: Any,
) -> None:
    """The call that waited in vain for a connection must not put back one it never took.

    Before, it added a phantom slot: the holder's call then failed with
    FullPoolError, and the pool opened more than ``pool_maxsize`` connections.
    """
    release = threading.Event()

    def slow_then_quick(request: RawRequest) -> bytes:
        if request.target.startswith("/slow"):
            release.wait(5)
        return response(200, envelope(request.target))

    with ScriptedServer([serve(slow_then_quick)]) as server:
        d = make_dispatcher(pool_maxsize=1, retry_attempts=1)
        results: list[Any] = []
        holder = threading.Thread(target=lambda: results.append(d.call(f"{server.url}/slow")))
        holder.start()
        assert server.wait_until(lambda s: len(s.requests) == 1, timeout=5)
        with pytest.raises(DispatchTimeout, match="no pooled connection"):
            d.apply(f"{server.url}/waiter", timeout=0.2)
        release.set()
        holder.join(10)
        assert results == ["/slow"]
        threads = [
            threading.Thread(target=lambda n=n: results.append(d.call(f"{server.url}/q{n}")))
            for n in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(results[1:]) == sorted(f"/q{n}" for n in range(8))
        assert server.connections_accepted == 1  # pool_maxsize=1, blocking


# -- a task id that cannot be a header ------------------------------------------------


@pytest.mark.parametrize("task_id", ["id\r\nX-Injected: 1", "€uro", "id\x00"])
def test_a_task_id_that_cannot_be_a_header_is_a_usage_error(
    make_dispatcher: Any, task_id: str
) -> None:
    with ScriptedServer([serve()]) as server:
        d = make_dispatcher()
        with pytest.raises(UsageError, match="Idempotency-Key"):
            d.apply(f"{server.url}/t", "GET", task_id=task_id)
        assert server.connections_accepted == 0


# -- numbers JSON cannot carry ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"x": float("nan")}, "x"),
        ({"ok": 1.5, "y": float("inf")}, "y"),
        ({"points": [1.0, float("-inf")]}, "points"),
        ({"nested": {"deep": [{"v": float("nan")}]}}, "nested"),
    ],
)
def test_json_refuses_nan_and_infinity(
    make_dispatcher: Any, kwargs: dict[str, Any], named: str
) -> None:
    """orjson would send them as null, silently changing the argument."""
    with ScriptedServer([serve()]) as server:
        d = make_dispatcher()
        with pytest.raises(EncodeError, match="JSON") as info:
            d.apply(f"{server.url}/t", "POST", kwargs, json=True)
        assert info.value.argument == named
        assert server.connections_accepted == 0


def test_json_still_sends_a_real_null(make_dispatcher: Any) -> None:
    with ScriptedServer([serve()]) as server:
        d = make_dispatcher()
        sent = d.apply(f"{server.url}/t", "POST", {"x": None, "y": [None, 1.5]}, json=True)
        assert sent == '{"x":null,"y":[null,1.5]}'


# -- urllib3's HTTP/2 switch ---------------------------------------------------------------


def test_urllib3_http2_injection_is_refused_with_a_clear_error(make_dispatcher: Any) -> None:
    """Our HTTPS connections speak HTTP/1.1; with h2 offered in ALPN they would be lied to."""
    http2 = pytest.importorskip("urllib3.http2")
    pytest.importorskip("h2")
    d = make_dispatcher(retry_attempts=1)
    http2.inject_into_urllib3()
    try:
        with pytest.raises(UsageError, match="inject_into_urllib3"):
            d.call("https://127.0.0.1:9/t")
    finally:
        http2.extract_from_urllib3()
    with pytest.raises(TransportError):  # back to HTTP/1.1: an ordinary connect error
        d.call("https://127.0.0.1:9/t")


def test_urllib3_http2_injected_before_import_is_refused_too() -> None:
    pytest.importorskip("h2")
    code = (
        "import urllib3.http2; urllib3.http2.inject_into_urllib3()\n"
        "from dispatchkit import Dispatcher, UsageError\n"
        "try:\n"
        "    Dispatcher(retry_attempts=1).call('https://127.0.0.1:9/t')\n"
        "except UsageError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert "refused:" in done.stdout, done.stderr
    assert "inject_into_urllib3" in done.stdout
