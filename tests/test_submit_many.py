"""``Dispatcher.submit_many`` and ``submit_calls``: many calls at once, each with its own task
id, on any executor."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any

import pytest

from conftest import peer_stats
from dispatchkit import AsyncResult, Call, Dispatcher, EncodeError, UsageError, hookimpl


def test_each_call_comes_back_in_order_with_its_own_id(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(pool_maxsize=4)
    results = d.submit_many(f"{peer}/multiply", [{"x": i, "y": 3} for i in range(40)])
    assert [r.get(timeout=10) for r in results] == [i * 3 for i in range(40)]
    assert len({r.id for r in results}) == 40


def test_every_call_gets_the_shared_arguments(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher()
    results = d.submit_many(
        f"{peer}/echo",
        [{"n": 1}, {"n": 2}],
        "POST",
        json=True,
        headers={"X-Batch": "yes"},
        timeout=3,
    )
    seen = [r.get(timeout=10) for r in results]
    assert [s["args"] for s in seen] == [{"n": 1}, {"n": 2}]
    assert all(s["method"] == "POST" and s["headers"]["x-batch"] == "yes" for s in seen)
    assert [s["headers"]["idempotency-key"] for s in seen] == [r.id for r in results]


def test_a_bad_call_raises_before_any_is_sent(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher()
    d.call(f"{peer}/stats/reset")
    with pytest.raises(EncodeError):
        d.submit_many(f"{peer}/multiply", [{"x": 1, "y": 2}, {"x": object(), "y": 2}])
    with pytest.raises(UsageError):
        d.submit_many(f"{peer}/multiply", [{"x": 1, "y": 2}], "BREW")
    assert peer_stats(d, peer)["requests"] == 1  # the stats call itself


def test_no_calls_no_results(make_dispatcher: Any, peer: str) -> None:
    assert make_dispatcher().submit_many(f"{peer}/multiply", []) == []


class _Batching:
    """An executor with ``submit_many``: it gets the whole batch at once."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.batches: list[list[Call]] = []

    def submit(self, call: Call) -> AsyncResult:
        raise AssertionError("submit_many must be used")

    def submit_many(self, calls: Sequence[Call]) -> list[AsyncResult]:
        self.batches.append(list(calls))
        results = []
        for call in calls:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_result(self.dispatcher.execute(call))
            results.append(AsyncResult(call.task_id, future))
        return results

    def shutdown(self, wait: bool = True) -> None:
        pass


class _BatchingPlugin:
    name = "batching"

    def __init__(self) -> None:
        self.executor: _Batching | None = None

    @hookimpl
    def dispatchkit_executor(self, dispatcher: Dispatcher) -> _Batching | None:
        if dispatcher.settings.executor != "batching":
            return None
        self.executor = _Batching(dispatcher)
        return self.executor


def test_an_executor_with_submit_many_gets_the_whole_batch(make_dispatcher: Any, peer: str) -> None:
    plugin = _BatchingPlugin()
    d = make_dispatcher(plugins=[plugin], executor="batching")
    results = d.submit_many(f"{peer}/multiply", [{"x": i, "y": 2} for i in range(5)], "post")
    assert [r.get() for r in results] == [0, 2, 4, 6, 8]
    assert plugin.executor is not None
    [batch] = plugin.executor.batches
    assert [c.task_id for c in batch] == [r.id for r in results]
    assert {c.method for c in batch} == {"POST"}  # checked and normalised in the caller


def test_submit_calls_sends_each_call_as_it_is_given(make_dispatcher: Any, peer: str) -> None:
    """Calls of one batch to different URLs, methods and arguments; an id given is kept,
    a call without one gets its own."""
    d = make_dispatcher()
    calls = [
        Call(f"{peer}/multiply", "GET", {"x": 6, "y": 7}, "evt-1-a"),
        Call(f"{peer}/echo", "POST", {"n": 1}, json=True, headers={"X-Receiver": "b"}),
        Call(f"{peer}/multiply", "post", {"x": 2, "y": 3}),
    ]
    results = d.submit_calls(iter(calls))
    assert results[0].get(timeout=10) == 42
    echo = results[1].get(timeout=10)
    assert (echo["method"], echo["args"], echo["headers"]["x-receiver"]) == ("POST", {"n": 1}, "b")
    assert results[2].get(timeout=10) == 6
    assert results[0].id == "evt-1-a"
    assert echo["headers"]["idempotency-key"] == results[1].id != ""
    assert len({r.id for r in results}) == 3


@pytest.mark.parametrize(
    ("make_calls", "error"),
    [
        (lambda peer: [Call(f"{peer}/multiply", task_id="a"), Call(f"{peer}/echo", task_id="a")],
         "task id 'a' is given to two calls"),
        (lambda peer: [Call(f"{peer}/multiply"), {"url": f"{peer}/echo"}],
         "takes dispatchkit.Call objects"),
        (lambda peer: [Call(f"{peer}/multiply"), Call(f"{peer}/echo", "BREW")], "BREW"),
        (lambda peer: [Call(f"{peer}/multiply"), Call(f"{peer}/echo", kwargs={"x": object()})],
         "object"),
    ],
)  # fmt: skip
def test_a_bad_batch_of_calls_raises_before_any_is_sent(
    make_dispatcher: Any, peer: str, make_calls: Any, error: str
) -> None:
    d = make_dispatcher()
    d.call(f"{peer}/stats/reset")
    with pytest.raises((UsageError, EncodeError), match=error):
        d.submit_calls(make_calls(peer))
    assert peer_stats(d, peer)["requests"] == 1  # the stats call itself


def test_an_executor_with_submit_many_gets_a_batch_of_calls_whole(
    make_dispatcher: Any, peer: str
) -> None:
    plugin = _BatchingPlugin()
    d = make_dispatcher(plugins=[plugin], executor="batching")
    calls = [Call(f"{peer}/multiply", kwargs={"x": 3, "y": 3}), Call(f"{peer}/echo", "POST")]
    results = d.submit_calls(calls)
    assert results[0].get() == 9
    assert plugin.executor is not None
    [batch] = plugin.executor.batches
    assert [c.url for c in batch] == [f"{peer}/multiply", f"{peer}/echo"]
