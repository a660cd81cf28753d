"""Asynchronous dispatch: submit, map, AsyncResult, the executor hook, the Celery-compatible API."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Mapping
from typing import Any, cast

import pytest

import dispatchkit
from conftest import peer_stats
from dispatchkit import (
    URL,
    AsyncResult,
    Call,
    Dispatcher,
    EncodeError,
    HttpDispatchTask,
    RemoteExecuteError,
    ResultTimeout,
    UsageError,
    hookimpl,
    states,
)

# -- submit and AsyncResult ------------------------------------------------------


def test_a_thousand_calls_in_flight_through_one_dispatcher(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(pool_maxsize=8)
    d.call(f"{peer}/stats/reset")
    results = [d.submit(f"{peer}/multiply", "POST", x=i, y=2) for i in range(1000)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(1000)]
    assert len({r.id for r in results}) == 1000
    stats = peer_stats(d, peer)
    assert stats["requests"] == 1001
    assert stats["connections"] <= 8  # never more connections than the pool holds


def test_result_id_is_the_idempotency_key(dispatcher: Dispatcher, peer: str) -> None:
    result = dispatcher.apply_async(f"{peer}/record", task_id="job-7")
    assert result.id == "job-7"
    assert result.get(timeout=10) == "job-7"
    auto = dispatcher.submit(f"{peer}/record")
    assert auto.get(timeout=10) == auto.id


def test_get_with_a_timeout_leaves_the_task_running(dispatcher: Dispatcher, peer: str) -> None:
    result = cast(AsyncResult, dispatcher.submit(f"{peer}/slow", delay=600))
    with pytest.raises(ResultTimeout, match=r"did not finish within 0\.05s") as info:
        result.get(timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert result.state in (states.PENDING, states.STARTED)
    assert not result.ready()
    assert result.result is None
    assert result.get(timeout=10) == 600  # it went on
    assert result.state == states.SUCCESS


def test_failure_propagates_with_its_reason(dispatcher: Dispatcher, peer: str) -> None:
    result = cast(AsyncResult, dispatcher.submit(f"{peer}/fail", reason="disk full"))
    with pytest.raises(RemoteExecuteError) as info:
        result.get(timeout=10)
    assert info.value.reason == "disk full"
    assert info.value.task_id == result.id
    assert result.failed()
    assert not result.successful()
    assert result.state == states.FAILURE
    assert result.result is info.value
    assert result.traceback is not None
    assert "RemoteExecuteError: disk full" in result.traceback
    assert result.get(propagate=False) is info.value


def test_success_state(dispatcher: Dispatcher, peer: str) -> None:
    result = cast(AsyncResult, dispatcher.submit(f"{peer}/multiply", x=3, y=4))
    assert result.get(timeout=10) == 12
    assert (result.ready(), result.successful(), result.failed()) == (True, True, False)
    assert result.result == 12
    assert result.traceback is None


def test_bad_arguments_raise_at_submit(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(EncodeError, match="'bad'"):
        dispatcher.submit(f"{peer}/multiply", bad={"no": "dicts"})
    with pytest.raises(UsageError):
        dispatcher.submit(f"{peer}/multiply", "FETCH")


def test_done_callbacks_and_futures_compose(dispatcher: Dispatcher, peer: str) -> None:
    seen: list[tuple[str, str]] = []
    finished = threading.Event()
    results = [cast(AsyncResult, dispatcher.submit(f"{peer}/multiply", x=i, y=i)) for i in range(5)]
    results[0].add_done_callback(
        lambda r: (seen.append((r.id, r.state)), finished.set())  # type: ignore[func-returns-value]
    )
    assert finished.wait(10)
    assert seen == [(results[0].id, states.SUCCESS)]
    assert isinstance(results[0], AsyncResult)
    done, not_done = concurrent.futures.wait([r.future for r in results], timeout=10)
    assert not not_done
    assert sorted(f.result() for f in done) == [0, 1, 4, 9, 16]


def test_a_failing_done_callback_is_logged(
    dispatcher: Dispatcher, peer: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: AsyncResult) -> None:
        raise RuntimeError("callback bug")

    result = dispatcher.submit(f"{peer}/multiply", x=1, y=1)
    assert isinstance(result, AsyncResult)
    with caplog.at_level(logging.ERROR, logger="dispatchkit"):
        result.get(timeout=10)
        result.add_done_callback(broken)  # already done: runs at once
    assert any("callback" in r.getMessage() for r in caplog.records)


# -- map ---------------------------------------------------------------------------


def test_map_returns_results_in_order(dispatcher: Dispatcher, peer: str) -> None:
    values = dispatcher.map(f"{peer}/multiply", ({"x": i, "y": 2} for i in range(300)))
    assert values == [2 * i for i in range(300)]


def test_map_concurrency_is_bounded(make_dispatcher: Any, peer: str) -> None:
    class InFlight:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.now = self.peak = 0

        @hookimpl
        def dispatchkit_prepare_request(self, request: dispatchkit.Request) -> None:
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)

        @hookimpl
        def dispatchkit_call_done(
            self, request: dispatchkit.Request, outcome: dispatchkit.Outcome
        ) -> None:
            with self.lock:
                self.now -= 1

    probe = InFlight()
    d = make_dispatcher(plugins=[probe], pool_maxsize=16)
    values = d.map(f"{peer}/slow", [{"delay": 20}] * 40, concurrency=3)
    assert values == [20] * 40
    assert 1 <= probe.peak <= 3


def test_map_raises_the_first_error_and_stops(dispatcher: Dispatcher, peer: str) -> None:
    calls: list[Mapping[str, object]] = [
        {"x": 1, "y": 1},
        {"x": "one", "y": 1},
        *({"x": i, "y": 1} for i in range(500)),
    ]
    dispatcher.call(f"{peer}/stats/reset")
    with pytest.raises(RemoteExecuteError, match="one"):
        dispatcher.map(f"{peer}/multiply", calls, concurrency=2)
    # At most the window after the failure was in flight: the other ~500 never started.
    assert peer_stats(dispatcher, peer)["requests"] <= 1 + 2 + 2


def test_map_can_return_exceptions(dispatcher: Dispatcher, peer: str) -> None:
    values = dispatcher.map(
        f"{peer}/multiply", [{"x": 2, "y": 2}, {"x": "z", "y": 1}], return_exceptions=True
    )
    assert values[0] == 4
    assert isinstance(values[1], RemoteExecuteError)


# -- the executor hook and close() ----------------------------------------------------


class InlineExecutor:
    """Runs each call at submit time, in the caller's thread."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.calls: list[Call] = []
        self.shut = False

    def submit(self, call: Call) -> AsyncResult:
        self.calls.append(call)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(self.dispatcher.execute(call))
        except Exception as exc:
            future.set_exception(exc)
        return AsyncResult(call.task_id, future)

    def shutdown(self, wait: bool = True) -> None:
        self.shut = True


class InlinePlugin:
    name = "inline"

    def __init__(self) -> None:
        self.executor: InlineExecutor | None = None

    @hookimpl
    def dispatchkit_executor(self, dispatcher: Dispatcher) -> InlineExecutor | None:
        if dispatcher.settings.executor != "inline":
            return None
        self.executor = InlineExecutor(dispatcher)
        return self.executor


def test_an_executor_plugin_is_chosen_by_setting(make_dispatcher: Any, peer: str) -> None:
    plugin = InlinePlugin()
    d = make_dispatcher(plugins=[plugin], executor="inline")
    result = d.apply_async(f"{peer}/multiply", "POST", {"x": 6, "y": 7}, task_id="inline-1")
    assert result.ready()  # ran inline
    assert result.get() == 42
    assert plugin.executor is not None
    assert plugin.executor.calls == [
        Call(f"{peer}/multiply", "POST", {"x": 6, "y": 7}, "inline-1", None, None, False)
    ]
    d.close()
    assert plugin.executor.shut


def test_executor_from_the_environment(
    make_dispatcher: Any, peer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCHKIT_EXECUTOR", "inline")
    plugin = InlinePlugin()
    d = make_dispatcher(plugins=[plugin])
    assert d.submit(f"{peer}/multiply", x=2, y=2).get() == 4
    assert plugin.executor is not None


def test_an_unknown_executor_is_a_usage_error(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(executor="nosuch")
    with pytest.raises(UsageError, match="no plugin provides the executor 'nosuch'"):
        d.submit(f"{peer}/multiply", x=1, y=1)


def test_executor_threads_setting(make_dispatcher: Any) -> None:
    d = make_dispatcher(executor_threads=3)
    assert d._get_executor().threads == 3
    with pytest.raises(UsageError, match="executor_threads"):
        Dispatcher(executor_threads=0)


def test_call_round_trips_as_plain_data() -> None:
    call = Call("http://h/t", "POST", {"x": [1, 2]}, "id", 2.5, {"X-A": "b"}, True)
    assert Call.from_dict(call.to_dict()) == call


def test_close_finishes_submitted_work(peer: str) -> None:
    d = Dispatcher(timeout=5)
    results = [d.submit(f"{peer}/slow", delay=100) for _ in range(20)]
    d.close()  # waits: nothing submitted is dropped
    assert all(r.ready() for r in results)
    assert [r.get() for r in results] == [100] * 20
    with pytest.raises(UsageError, match="closed"):
        d.submit(f"{peer}/multiply", x=1, y=1)


# -- the Celery-compatible API ---------------------------------------------------------------


def test_url_query_is_editable(dispatcher: Dispatcher, peer: str) -> None:
    url = URL(f"{peer}/echo?a=1&tag=x&tag=y", dispatcher=dispatcher)
    assert url.query == {"a": "1", "tag": ["x", "y"]}
    url.query["a"] = "2"
    url.query["b"] = "ü"
    assert str(url) == f"{peer}/echo?a=2&tag=x&tag=y&b=%C3%BC"
    echo = url.get(a="3")
    assert echo["query"] == [["tag", "x"], ["tag", "y"], ["b", "ü"], ["a", "3"]]


def test_url_calls(dispatcher: Dispatcher, peer: str) -> None:
    url = URL(f"{peer}/multiply", dispatcher=dispatcher)
    assert url.get(x=10, y=10) == 100
    assert url.post(x=10, y=10) == 100
    assert url.get_async(x=10, y=10).get(timeout=10) == 100
    assert url.post_async(x=2, y=3).get(timeout=10) == 6
    assert "s3cret" not in repr(URL("http://u:s3cret@127.0.0.1/t"))


def test_http_dispatch_task(peer: str) -> None:
    res = HttpDispatchTask.delay(url=f"{peer}/multiply", method="GET", x=10, y=10)
    assert res.get(timeout=10) == 100
    res = HttpDispatchTask.apply_async(
        kwargs={"url": f"{peer}/multiply", "method": "POST", "x": 3, "y": 3}, task_id="compat-1"
    )
    assert res.id == "compat-1"
    assert res.get(timeout=10) == 9
    with pytest.raises(UsageError, match="url"):
        HttpDispatchTask.apply_async(kwargs={"x": 1})
    with pytest.raises(TypeError):
        HttpDispatchTask()


def test_default_dispatcher_is_shared_and_lazy() -> None:
    assert dispatchkit.default_dispatcher() is dispatchkit.default_dispatcher()


def test_log_lines_in_celerys_shape(
    dispatcher: Dispatcher, peer: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dispatchkit"):
        ok = dispatcher.submit(f"{peer}/multiply", x=10, y=10)
        bad = dispatcher.submit(f"{peer}/fail", reason="nope")
        ok.get(timeout=10)
        bad.get(timeout=10, propagate=False)
    lines = {r.getMessage() for r in caplog.records if r.name == "dispatchkit"}
    assert f"Task dispatchkit.HttpDispatchTask[{ok.id}] processed: 100" in lines
    assert f"Task dispatchkit.HttpDispatchTask[{bad.id}] raised RemoteExecuteError: nope" in lines
