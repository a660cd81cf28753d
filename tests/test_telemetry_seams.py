"""The core's seams for telemetry plugins, against a real TaskApp on loopback.

* ``dispatchkit_submit_options``: called in the caller's thread when a call is
  handed to the executor; what it returns travels with the call as options,
  checked like the caller's own (no secrets), the caller's own winning.
* ``Attempt.pool_wait``: the time an attempt waited for a connection of a full
  pool (``pool_maxsize``), measured by both built-in transports.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from dispatchkit import (
    AsyncDispatcher,
    Attempt,
    Call,
    Dispatcher,
    DispatchError,
    Request,
    UsageError,
    hookimpl,
)
from dispatchkit.server import TaskApp

pytestmark = pytest.mark.timeout(60)

ARRIVED = threading.Event()


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    app = TaskApp()

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    @app.task
    def hold(seconds: float) -> float:
        ARRIVED.set()  # the caller now holds a pooled connection until this returns
        time.sleep(seconds)
        return seconds

    with app.server(port=0) as server:
        yield server.url
    app.close()


class Stamp:
    """Adds the submitting thread's id to every submitted call, and counts its calls."""

    name = "stamp"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []  # (task id, thread id)

    @hookimpl
    def dispatchkit_submit_options(self, call: Call) -> Mapping[str, str] | None:
        self.seen.append((call.task_id, threading.get_ident()))
        return {"stamp_thread": str(threading.get_ident()), "stamp_extra": "x"}


class Reader:
    """Keeps each call's options as the attempt that sends it sees them."""

    name = "reader"

    def __init__(self) -> None:
        self.options: dict[str, dict[str, str]] = {}

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self.options[request.task_id] = dict(request.options)


class Answer:
    """Returns whatever it is given from ``dispatchkit_submit_options``, or raises it."""

    name = "answer"

    def __init__(self, answer: object) -> None:
        self.answer = answer

    @hookimpl
    def dispatchkit_submit_options(self, call: Call) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


# -- dispatchkit_submit_options ----------------------------------------------------------


def test_options_from_the_hook_travel_with_every_submitted_call(base: str) -> None:
    stamp, reader = Stamp(), Reader()
    here = str(threading.get_ident())
    with Dispatcher(timeout=5, plugins=[stamp, reader]) as d:
        one = d.submit(f"{base}/multiply", x=2, y=3)
        many = d.submit_many(f"{base}/multiply", [{"x": 1, "y": 1}, {"x": 2, "y": 2}])
        (each,) = d.submit_calls([Call(f"{base}/multiply", kwargs={"x": 4, "y": 4})])
        assert d.map(f"{base}/multiply", [{"x": 3, "y": 3}]) == [9]
        assert one.get(timeout=10) == 6
        assert [r.get(timeout=10) for r in many] == [1, 4]
        assert each.get(timeout=10) == 16
        assert d.call(f"{base}/multiply", x=1, y=1) == 1  # not submitted: not asked
    # Asked once per submitted call, in the caller's thread (the calls ran on the pool's).
    assert len(stamp.seen) == 5
    assert {thread for _, thread in stamp.seen} == {threading.get_ident()}
    submitted = {task_id for task_id, _ in stamp.seen}
    assert {one.id, many[0].id, many[1].id, each.id} <= submitted
    for task_id in submitted:
        assert reader.options[task_id] == {"stamp_thread": here, "stamp_extra": "x"}
    (direct,) = set(reader.options) - submitted
    assert reader.options[direct] == {}


def test_the_callers_own_options_win(base: str) -> None:
    reader = Reader()
    with Dispatcher(timeout=5, plugins=[Stamp(), reader]) as d:
        result = d.apply_async(
            f"{base}/multiply", kwargs={"x": 1, "y": 2}, options={"stamp_extra": "mine"}
        )
        assert result.get(timeout=10) == 2
    assert reader.options[result.id]["stamp_extra"] == "mine"
    assert reader.options[result.id]["stamp_thread"] == str(threading.get_ident())


def test_a_secret_from_a_plugin_is_refused_before_anything_is_queued(base: str) -> None:
    reader = Reader()
    with Dispatcher(timeout=5, plugins=[Answer({"leak_key": "whsec_c2VjcmV0"}), reader]) as d:
        with pytest.raises(UsageError, match="holds a signing secret"):
            d.submit(f"{base}/multiply", x=1, y=1)
        with pytest.raises(UsageError, match="holds a signing secret"):
            d.submit_many(f"{base}/multiply", [{"x": 1, "y": 1}])
    assert reader.options == {}  # nothing was sent
    assert "whsec_" not in repr(reader.options)


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (RuntimeError("boom"), DispatchError, "plugin failure: RuntimeError: boom"),
        (["stamp_thread"], UsageError, "returned list, not a mapping"),
        ({"Bad Name": "x"}, UsageError, "option name 'Bad Name'"),
    ],
)
def test_a_broken_hook_fails_the_submit(
    base: str, answer: object, error: type[Exception], match: str
) -> None:
    reader = Reader()
    with (
        Dispatcher(timeout=5, plugins=[Answer(answer), reader]) as d,
        pytest.raises(error, match=match) as info,
    ):
        d.apply_async(f"{base}/multiply", kwargs={"x": 1, "y": 1}, task_id="t-1")
    assert reader.options == {}
    if isinstance(answer, Exception):
        assert info.value.__cause__ is answer
        assert isinstance(info.value, DispatchError)
        assert info.value.task_id == "t-1"


def test_the_hook_is_left_alone_when_nobody_implements_it(base: str) -> None:
    with Dispatcher(timeout=5) as d:
        assert d._submit_options is None  # a submit asks pluggy nothing
        assert d.submit(f"{base}/multiply", x=3, y=3).get(timeout=10) == 9
    with Dispatcher(timeout=5, plugins=[Stamp()]) as d:
        assert d._submit_options is not None


# -- Attempt.pool_wait -------------------------------------------------------------------


def test_a_wait_for_a_full_pool_is_in_the_attempt_record(base: str) -> None:
    ARRIVED.clear()
    holding: list[Attempt] = []
    waiting: list[Attempt] = []
    with Dispatcher(timeout=10, pool_maxsize=1) as d:
        holder = threading.Thread(
            target=d.execute, args=(Call(f"{base}/hold", kwargs={"seconds": 0.4}),),
            kwargs={"attempts": holding},
        )  # fmt: skip
        holder.start()
        assert ARRIVED.wait(10)  # the one connection is taken, for 0.4 s more
        d.execute(Call(f"{base}/multiply", kwargs={"x": 2, "y": 2}), attempts=waiting)
        holder.join(10)
        free: list[Attempt] = []
        d.execute(Call(f"{base}/multiply", kwargs={"x": 2, "y": 2}), attempts=free)
    (held,), (waited,), (alone,) = holding, waiting, free
    assert held.pool_wait == 0.0
    assert alone.pool_wait == 0.0
    assert 0.2 < waited.pool_wait <= waited.duration
    # The record keeps it, and an attempt that did not wait says nothing of it.
    assert Attempt.from_dict(waited.to_dict()) == waited
    assert "pool_wait" not in alone.to_dict()


class Records:
    """Keeps every attempt's record, as a telemetry plugin would see it."""

    name = "records"

    def __init__(self) -> None:
        self.attempts: dict[str, Attempt] = {}

    @hookimpl
    def dispatchkit_attempt_done(self, request: Request, attempt: Attempt) -> None:
        self.attempts[request.task_id] = attempt


def test_the_asyncio_transport_measures_the_wait_too(base: str) -> None:
    ARRIVED.clear()
    records = Records()

    async def main() -> None:
        async with AsyncDispatcher(timeout=10, pool_maxsize=1, plugins=[records]) as d:
            holder = asyncio.ensure_future(
                d.apply(f"{base}/hold", kwargs={"seconds": 0.4}, task_id="holder")
            )
            assert await asyncio.to_thread(ARRIVED.wait, 10)
            await d.apply(f"{base}/multiply", kwargs={"x": 1, "y": 1}, task_id="waiter")
            await holder
            await d.apply(f"{base}/multiply", kwargs={"x": 1, "y": 1}, task_id="alone")

    asyncio.run(main())
    assert records.attempts["holder"].pool_wait == 0.0
    assert records.attempts["alone"].pool_wait == 0.0
    waited = records.attempts["waiter"]
    assert 0.2 < waited.pool_wait <= waited.duration


@pytest.mark.parametrize("bad", [-1.0, float("inf"), True, "0.5"])
def test_a_malformed_pool_wait_is_refused(bad: object) -> None:
    data = Attempt(1, 1_700_000_000.25, 0.5, "200", 200, None, "{}", "host:1", 0.25).to_dict()
    assert data["pool_wait"] == 0.25
    data["pool_wait"] = bad
    with pytest.raises(UsageError, match="pool_wait"):
        Attempt.from_dict(data)
