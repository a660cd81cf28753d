"""The Dispatcher against the project's own TaskApp: both ends of the protocol in Python."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dispatchkit import Dispatcher, RemoteExecuteError
from dispatchkit.server import TaskApp, TaskServer

app = TaskApp()


@app.task
def multiply(x: int, y: int) -> int:
    return x * y


@app.task
def describe(
    text: str, count: int, ratio: float, flag: bool, items: list[str], maybe: int | None = None
) -> dict[str, Any]:
    return {"text": text, "count": count, "ratio": ratio, "flag": flag, "items": items,
            "maybe": maybe}  # fmt: skip


@app.task
def explode(message: str) -> None:
    raise RuntimeError(message)


@pytest.fixture(scope="module")
def server() -> Iterator[TaskServer]:
    with app.server(port=0) as running:
        yield running


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_multiply(dispatcher: Dispatcher, server: TaskServer, method: str) -> None:
    assert dispatcher.call(f"{server.url}/multiply", method, x=10, y=10) == 100


@pytest.mark.parametrize("method", ["GET", "POST", "JSON"])
def test_arguments_round_trip_unchanged(
    dispatcher: Dispatcher, server: TaskServer, method: str
) -> None:
    args = {
        "text": "grüße, ☃ & = ? #",
        "count": -42,
        "ratio": 0.125,
        "flag": False,
        "items": ["a b", "ü", "", "x&y"],
        "maybe": 7,
    }
    if method == "JSON":
        got = dispatcher.apply(f"{server.url}/describe", "POST", args, json=True)
    else:
        got = dispatcher.call(f"{server.url}/describe", method, **args)
    assert got == args


def test_optional_left_out(dispatcher: Dispatcher, server: TaskServer) -> None:
    got = dispatcher.call(
        f"{server.url}/describe", text="t", count=1, ratio=1.5, flag=True, items=["i"], maybe=None
    )
    assert got["maybe"] is None


def test_task_exception_is_a_remote_failure(dispatcher: Dispatcher, server: TaskServer) -> None:
    with pytest.raises(RemoteExecuteError) as info:
        dispatcher.call(f"{server.url}/explode", "POST", message="kaboom")
    assert info.value.reason == "RuntimeError: kaboom"
    assert info.value.status == 500


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "reason"),
    [
        ("multiply", {"x": 1}, 400, "'y'"),
        ("multiply", {"x": "one", "y": 2}, 400, "'x'"),
        ("multiply", {"x": 1, "y": 2, "z": 3}, 400, "'z'"),
        ("nope", {}, 404, "nope"),
    ],
)
def test_bad_calls_answer_failure_envelopes(
    dispatcher: Dispatcher,
    server: TaskServer,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    reason: str,
) -> None:
    with pytest.raises(RemoteExecuteError) as info:
        dispatcher.call(f"{server.url}/{path}", **kwargs)
    assert info.value.status == status
    assert reason in info.value.reason


def test_wrong_method_is_405_with_an_envelope(dispatcher: Dispatcher, server: TaskServer) -> None:
    with pytest.raises(RemoteExecuteError) as info:
        dispatcher.call(f"{server.url}/multiply", "DELETE", x=1, y=2)
    assert info.value.status == 405


def test_keep_alive_counted_by_the_server(make_dispatcher: Any) -> None:
    with app.server(port=0) as fresh:
        d: Dispatcher = make_dispatcher()
        for i in range(30):
            assert d.call(f"{fresh.url}/multiply", "POST" if i % 2 else "GET", x=i, y=i) == i * i
        assert fresh.stats.requests_served == 30
        assert fresh.stats.connections_opened == 1
