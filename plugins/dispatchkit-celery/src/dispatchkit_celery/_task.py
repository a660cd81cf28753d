"""The worker's side: task ``dispatchkit.http_dispatch``, one attempt per delivery.

Task ``dispatchkit.http_dispatch_batch`` carries the first attempt of a chunk
of calls (``submit_many``) and runs them concurrently, ``pool_maxsize`` at a
time, on the worker process's event loop (:class:`ChunkLoop`, with an
``AsyncDispatcher``: :func:`dispatch_call_async`) or on its threads (worker
setting ``chunk_runner``), each through the same per-call steps with its own
task id: taken in the ledger, attempts recorded, result stored under that id, a
wait or a dead letter of its own. A call the chunk could not start in time to
finish within the visibility timeout is sent on as a single message instead.

An attempt that fails and may be retried is not retried here: the worker
records the wait in the delivery ledger, sets Celery state ``RETRY``, and lets
Celery acknowledge the message (``Ignore``). A poller sends the next attempt
when it is due (see ``_poller.py``), so no worker process waits.

An attempt the endpoint guard turns away (the origin's breaker is open, or no
slot at it within ``endpoint_wait``) sent nothing: the call goes back into the
ledger, due when the origin takes calls again, with the same attempt number.

Every attempt's record (``dispatchkit.Attempt``) goes into the ledger: with the
wait, or before the result is stored when it was the call's last. A call whose
schedule ran out on failures worth retrying becomes a dead letter
(``_dead_letters.py``) in the same transaction.

A chunk's calls share their round trips to Redis (``_coalesce.py``): the writes
of the calls that start or end at the same moment go in one pipeline, and a
call's end is one script for its records, its result and its ``done`` (in that
order), where the result backend is Celery's Redis backend on the ledger's
Redis (``_results.py``; else the backend's own ``store_result``). A message of
one call takes its attempt and stores ``STARTED`` in one script the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import celery
import redis
from celery.exceptions import Ignore, Reject
from redis.client import Pipeline

from dispatchkit import (
    AsyncDispatcher,
    Attempt,
    Call,
    Dispatcher,
    DispatchError,
    EndpointDisabledError,
    UsageError,
)
from dispatchkit._endpoints import endpoint_key
from dispatchkit_celery._coalesce import Commands, LoopBatch, Turn
from dispatchkit_celery._config import (
    WorkerConfig,
    build_async_dispatcher,
    build_dispatcher,
    is_redis,
)
from dispatchkit_celery._dead_letters import bury
from dispatchkit_celery._guard import (
    RedisGuard,
    Reports,
    Ride,
    deferrable,
    deferred_until,
    queue_reports,
)
from dispatchkit_celery._ledger import Ledger, taken_offset
from dispatchkit_celery._results import StateWriter, Stored, state_writer
from dispatchkit_celery._schedule import RetrySchedule
from dispatchkit_celery._wire import CarriedError, Waiting, send_call

log = logging.getLogger("dispatchkit.celery")

#: How long a done call's ledger record is kept when the app sets no ``result_expires``.
DEFAULT_DONE_TTL = 24 * 3600.0
#: The share of its visibility timeout a chunk's calls may fill: one starts only if its
#: longest attempt ends within it (the rest is for the writes and the ack).
CHUNK_SHARE = 0.85


T = TypeVar("T")


class _Process:
    """What one worker process builds once: its settings, Dispatcher and ledger."""

    def __init__(self, broker: str) -> None:
        self.pid = os.getpid()
        self.config = WorkerConfig.from_env(broker)
        self._dispatcher: Dispatcher | None = None
        self._ledger: Ledger | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._writer: tuple[StateWriter | None] | None = None
        self._runner: tuple[ChunkLoop | None] | None = None
        self._lock = threading.RLock()  # a part may be made of others (the runner)

    # Each is built once, under the lock; read without it after that (a chunk's threads
    # read them several times a call, and a contended lock is a thread switch).

    def _built(self, name: str, build: Callable[[], T]) -> T:
        """Attribute ``name``, made by ``build()`` the first time (under the lock)."""
        found: T | None = getattr(self, name)
        if found is None:
            with self._lock:
                found = getattr(self, name)
                if found is None:
                    found = build()
                    setattr(self, name, found)
        return found

    @property
    def dispatcher(self) -> Dispatcher:
        return self._built("_dispatcher", lambda: build_dispatcher(self.config))

    @property
    def ledger(self) -> Ledger:
        return self._built("_ledger", self._new_ledger)

    def _new_ledger(self) -> Ledger:
        url = self.config.ledger_url
        assert url is not None  # WorkerConfig refuses a worker without one
        return Ledger(url)

    @property
    def guard(self) -> RedisGuard | None:
        """The dispatcher's guard, when it keeps its state on the ledger's Redis: its round
        trips can then ride on the ledger's pipelines."""
        return self.riding_guard(self.dispatcher)

    def riding_guard(self, dispatcher: Dispatcher | AsyncDispatcher) -> RedisGuard | None:
        """``dispatcher``'s guard, if its round trips can ride on the ledger's pipelines."""
        guard = dispatcher.endpoints.guard
        if isinstance(guard, RedisGuard) and guard.url == self.config.ledger_url:
            return guard
        return None

    def ride(self, call: dict[str, Any]) -> contextlib.AbstractContextManager[Ride | None]:
        """:meth:`RedisGuard.ride` for ``call`` on the Dispatcher's guard, where it allows it."""
        return ride_on(self.guard, call)

    def writer(self, app: celery.Celery) -> StateWriter | None:
        """Writes task states on the ledger's pipelines, where the backend allows it
        (kept in a 1-tuple: ``None`` is an answer too)."""
        url = self.config.ledger_url or ""
        return self._built("_writer", lambda: (state_writer(app, url),))[0]

    def runner(self, app: celery.Celery) -> ChunkLoop | None:
        """The event loop that runs this process's chunks (worker setting ``chunk_runner``);
        ``None``: threads run them (asked for, or the asyncio parts are missing)."""
        return self._built("_runner", lambda: (self._new_runner(app),))[0]

    def _new_runner(self, app: celery.Celery) -> ChunkLoop | None:
        if self.config.chunk_runner != "asyncio" or self.writer(app) is None:
            return None  # without its own result writes, a chunk's ends go one by one
        try:
            return ChunkLoop(self)
        except UsageError as exc:  # aiohttp is not installed
            log.warning("chunks run on threads: %s", exc)
            return None

    @property
    def threads(self) -> ThreadPoolExecutor:
        """The threads that run a chunk's calls: as many as the Dispatcher's pool of connections."""
        size = self.config.core.pool_maxsize
        return self._built(
            "_threads", lambda: ThreadPoolExecutor(size, thread_name_prefix="dispatchkit-batch")
        )


def ride_on(
    guard: RedisGuard | None, call: dict[str, Any]
) -> contextlib.AbstractContextManager[Ride | None]:
    """:meth:`RedisGuard.ride` for ``call`` on ``guard`` (``None``: no ride)."""
    url = call.get("url")
    if guard is None or not isinstance(url, str):
        return contextlib.nullcontext()
    try:
        return guard.ride(url)
    except (DispatchError, ValueError):  # a URL the call itself will refuse
        return contextlib.nullcontext()


class ChunkLoop:
    """A worker process's event loop for the calls of its chunks, on a thread of its own.

    The worker's AsyncDispatcher is made on it (the same settings and plugins
    as its Dispatcher), and the ledger's round trips of the calls that start
    or end in the same turn of the loop go in one pipeline (:class:`LoopBatch`).
    """

    def __init__(self, process: _Process) -> None:
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self.loop.run_forever, name="dispatchkit-chunks")
        thread.daemon = True  # a pool process ends without waiting for it
        thread.start()
        try:
            self.dispatcher = self.run(build_async_dispatcher(process.config), CHUNK_LOOP_START)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.batch = LoopBatch(process.ledger.batch)
        self.guard = process.riding_guard(self.dispatcher)
        config = process.config
        log.info(
            "chunks run on an event loop, up to %d calls of a chunk at a time, %d per origin",
            config.chunk_concurrency, config.core.pool_maxsize,
        )  # fmt: skip

    def run(self, work: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``work`` on the loop; cancelled, and Celery's ``Reject`` (requeue) after
        ``timeout`` seconds."""
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Reject(
                f"the chunk's calls did not end within {timeout:g}s", requeue=True
            ) from None


#: Seconds a worker process waits for its chunks' event loop to start.
CHUNK_LOOP_START = 30.0

_process: _Process | None = None
_process_lock = threading.Lock()


def worker_process(app: celery.Celery) -> _Process:
    """The resources of this process; a forked pool process builds its own."""
    global _process
    found = _process
    if found is not None and found.pid == os.getpid():
        return found
    with _process_lock:
        if _process is None or _process.pid != os.getpid():
            _process = _Process(app.conf.broker_url)
        return _process


class DispatchTask(celery.Task):  # type: ignore[misc]  # Celery ships no type hints
    """Marks a call with a durable schedule as done in the ledger, once its result is stored."""

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: Any,
    ) -> None:
        # Called after the backend stored the result, and never for Ignore (RETRY): a
        # crash before this line repeats the attempt, a crash after it loses nothing.
        if kwargs.get("schedule") is None or status not in ("SUCCESS", "FAILURE"):
            return
        if getattr(self.request, "dispatchkit_settled", False):  # ended with its result
            return
        # What take() said; a replay that came in meanwhile has its own: left alone.
        offset = getattr(self.request, "dispatchkit_offset", None)
        _finish(self.app, task_id, int(kwargs.get("attempt", 1)), offset)


@dataclass(slots=True)
class Delivery:
    """One call's share of a message: its task id, where the message came from and by
    which queue, and the call's offset as the ledger gave it (see :meth:`Ledger.take_attempt`;
    ``None`` until then, or when the ledger could not say)."""

    app: celery.Celery
    task_id: str
    hostname: str | None
    queue: str
    offset: int | None = None
    #: The endpoint guard's round trips for this call ride on its ledger writes (if any).
    ride: Ride | None = None
    #: The call's result is stored here, not by Celery (a chunk's call, or a message sent
    #: with ``ignore_result``): the records of its last attempt wait in ``records`` to be
    #: written with it.
    settles: bool = False
    records: list[dict[str, Any]] | None = None


def http_dispatch(
    task: DispatchTask,
    call: dict[str, Any],
    attempt: int = 1,
    schedule: Any = None,
    token: str = "",
) -> Any:
    """Make attempt ``attempt`` of the call; the task id is its Idempotency-Key.

    A message sent with ``ignore_result`` (every message of dispatchkit's own, see
    ``SEND_OPTIONS``) has the call's result stored here, with its records and its
    end in the ledger (:func:`_settle`); any other's result is Celery's to store,
    and :meth:`DispatchTask.after_return` ends the call in the ledger.
    """
    request = task.request
    settles = bool(getattr(request, "ignore_result", False))
    delivery = Delivery(task.app, request.id, request.hostname, _queue(task), settles=settles)
    ends = attempt if schedule is not None else None
    with worker_process(task.app).ride(call) as delivery.ride:
        try:
            retval = dispatch_call(delivery, call, attempt, schedule, token)
        except (Ignore, Reject):
            raise
        except Exception as exc:
            if settles:
                _settle_message(task, delivery, "FAILURE", exc, ends)
            raise
        else:
            if settles:
                _settle_message(task, delivery, "SUCCESS", retval, ends)
            return retval
        finally:
            request.dispatchkit_offset = delivery.offset  # for after_return


def _settle_message(
    task: DispatchTask, delivery: Delivery, state: str, value: Any, attempt: int | None
) -> None:
    """:func:`_settle` for a single message; one that cannot store its result is handed back."""
    try:
        _settle(delivery, worker_process(task.app), state, value, attempt)
    except Exception as exc:
        log.error("task %s: cannot store its result (%s): handed back", delivery.task_id, exc)
        raise Reject(str(exc), requeue=True) from None
    task.request.dispatchkit_settled = True  # after_return has nothing left to do


def http_dispatch_batch(
    task: celery.Task,
    calls: list[dict[str, Any]],
    attempt: int = 1,
    schedule: Any = None,
    token: str = "",
) -> None:
    """Make attempt ``attempt`` of each of ``calls``, concurrently, each under its own task id.

    Each call's result goes to the backend under its task id as its attempt ends.
    A call whose ledger or result could not be written hands the whole message
    back to the broker once the others ended: their copies are then duplicates.
    """
    process = worker_process(task.app)
    hostname, queue, started = task.request.hostname, _queue(task), time.monotonic()
    retries: Any = schedule  # read once for the chunk; unreadable, each call says so
    if schedule is not None:
        with contextlib.suppress(DispatchError):
            retries = RetrySchedule.from_dict(schedule)

    chunk = _Chunk(task.app, process, attempt, schedule, retries, token, hostname, queue,
                   started)  # fmt: skip
    runner = process.runner(task.app)
    if runner is not None:
        bound = process.config.visibility_timeout
        handed_back = runner.run(_run_chunk(chunk, runner, calls), bound)
    else:
        handed_back = _run_on_threads(chunk, calls)
    if handed_back:
        raise Reject(f"{handed_back} call(s) of the chunk could not be recorded", requeue=True)


def _run_on_threads(chunk: _Chunk, calls: list[dict[str, Any]]) -> int:
    """The calls of ``chunk`` on the process's threads; how many could not be recorded."""
    process = chunk.process
    handed_back = 0
    for outcome in list(process.threads.map(functools.partial(_run_in_batch, chunk), calls)):
        if isinstance(outcome, Ending):  # its end was posted: did it go in?
            try:
                _settled(outcome, process)
            except Exception as exc:
                log.error("task %s: cannot store its result (%s): chunk handed back",
                          outcome.delivery.task_id, exc)  # fmt: skip
                handed_back += 1
        else:
            handed_back += outcome
    return handed_back


def _run_in_batch(chunk: _Chunk, call: dict[str, Any]) -> bool | Ending:
    """One call of a chunk, as its own message would run it; ``True``: hand the chunk back,
    an :class:`Ending`: the call's end, posted (the chunk checks it)."""
    process, delivery = chunk.process, _chunk_delivery(chunk, call)
    if not isinstance(delivery, Delivery):
        return delivery
    with process.ride(call) as delivery.ride:
        try:
            retval = dispatch_call(delivery, call, chunk.attempt, chunk.retries, chunk.token)
        except Ignore:  # it waits in the ledger, or it was a duplicate
            return False
        except Reject:  # the ledger could not record it
            return True
        except Exception as exc:  # its failure: stored as the single task's would be
            state, value = "FAILURE", exc
        else:
            state, value = "SUCCESS", retval
        try:
            return _post_end(delivery, process, state, value, chunk.ends)
        except Exception as exc:
            log.error(
                "task %s: cannot store its result (%s): chunk handed back", delivery.task_id, exc
            )
            return True


def _chunk_delivery(chunk: _Chunk, call: dict[str, Any]) -> Delivery | bool:
    """The delivery of ``call`` if its chunk runs it here; else :func:`_not_run_here`'s
    answer (``True``: hand the chunk back)."""
    task_id = str(call.get("task_id") or "")
    if not task_id or _out_of_time(chunk.process.config, call.get("timeout"), chunk.started):
        return _not_run_here(chunk.app, call, task_id, chunk.attempt, chunk.schedule, chunk.queue)
    return Delivery(chunk.app, task_id, chunk.hostname, chunk.queue, settles=True)


def _not_run_here(
    app: celery.Celery,
    call: dict[str, Any],
    task_id: str,
    attempt: int,
    schedule: Any,
    queue: str,
) -> bool:
    """A chunk's call it does not run: without a task id (dropped), or one that could not
    end within the visibility timeout of the chunk's message (sent on alone; its message
    takes it in the ledger first, so a copy of the chunk is then a duplicate).
    ``True``: hand the chunk back."""
    if not task_id:  # the executor gives every call its id: not a message of ours
        log.error("a chunk's call without a task id: dropped")
        return False
    try:
        send_call(app, call, attempt, schedule, task_id=task_id, queue=queue)
    except Exception as exc:
        log.error("task %s: cannot send it on alone (%s): chunk handed back", task_id, exc)
        return True
    log.info("task %s: sent on alone, the chunk's time is up", task_id)
    return False


@dataclass(frozen=True, slots=True)
class _Chunk:
    """What the calls of one chunk share (see :func:`http_dispatch_batch`)."""

    app: celery.Celery
    process: _Process
    attempt: int
    schedule: Any  # as the message has it
    retries: Any  # the same, read (or, unreadable, as it came)
    token: str
    hostname: str | None
    queue: str
    started: float

    @property
    def ends(self) -> int | None:
        """The attempt a call's end marks done in the ledger; ``None``: no schedule, no ledger."""
        return self.attempt if self.schedule is not None else None


async def _run_chunk(chunk: _Chunk, runner: ChunkLoop, calls: list[dict[str, Any]]) -> int:
    """The calls of ``chunk`` on ``runner``'s loop; how many could not be recorded (the
    chunk is then handed back).

    Up to ``chunk_concurrency`` calls are in flight, at most ``pool_maxsize`` of them
    to one origin, each origin's in the chunk's order: a call waits for its origin's
    turn before its attempt starts, never inside it, so a slow receiver holds back
    its own calls and no others.
    """
    config = chunk.process.config
    slots = asyncio.Semaphore(config.chunk_concurrency)
    by_origin: dict[str, list[dict[str, Any]]] = {}
    for call in calls:
        by_origin.setdefault(_origin(call.get("url")), []).append(call)

    async def puller(pending: Iterator[dict[str, Any]]) -> int:
        handed_back = 0
        for call in pending:
            async with slots:
                handed_back += await _run_in_batch_async(chunk, runner, call)
        return handed_back

    pullers = []
    for group in by_origin.values():
        pending = iter(group)  # shared by the origin's pullers
        pullers += [puller(pending) for _ in range(min(config.core.pool_maxsize, len(group)))]
    return sum(await asyncio.gather(*pullers))


def _origin(url: Any) -> str:
    """The origin of ``url`` as the endpoint guard names it; ``""`` for what is not a URL
    (the call itself will say what is wrong with it)."""
    try:
        return endpoint_key(url)[0] if isinstance(url, str) else ""
    except UsageError:
        return ""


async def _run_in_batch_async(chunk: _Chunk, runner: ChunkLoop, call: dict[str, Any]) -> bool:
    """:func:`_run_in_batch` on the chunk's loop; ``True``: hand the chunk back."""
    process, delivery = chunk.process, _chunk_delivery(chunk, call)
    if not isinstance(delivery, Delivery):
        return delivery
    with ride_on(runner.guard, call) as delivery.ride:
        try:
            retval = await dispatch_call_async(
                delivery, runner, call, chunk.attempt, chunk.retries, chunk.token
            )
        except Ignore:  # it waits in the ledger, or it was a duplicate
            return False
        except Reject:  # the ledger could not record it
            return True
        except Exception as exc:  # its failure: stored as the single task's would be
            state, value = "FAILURE", exc
        else:
            state, value = "SUCCESS", retval
        ends = chunk.ends
        try:
            commands = _end_commands(delivery, process, state, value, ends)
            if commands is None:  # stored already, one write at a time
                return False
            replies = await runner.batch.try_run(commands)
            _check_end(Ending(delivery, state, value, ends, None), process, replies)
        except Exception as exc:
            log.error(
                "task %s: cannot store its result (%s): chunk handed back", delivery.task_id, exc
            )
            return True
        return False


@dataclass(slots=True)
class Ending:
    """A call's end on its way to Redis (:func:`_post_end`); :func:`_settled` checks it."""

    delivery: Delivery
    state: str
    value: Any
    attempt: int | None
    turn: Turn | None  # None: stored already, by the backend's store_result


def _settle(
    delivery: Delivery, process: _Process, state: str, value: Any, attempt: int | None
) -> None:
    """A call ended: its records, then its result, then (``attempt``: with a schedule)
    its ``done`` in the ledger; one script with the writes of the moment.

    Raises when the result could not be stored.
    """
    _settled(_post_end(delivery, process, state, value, attempt), process)


def _post_end(
    delivery: Delivery, process: _Process, state: str, value: Any, attempt: int | None
) -> Ending:
    """Post the call's end on the ledger's next pipeline, without waiting for it.

    A chunk's call goes on to the next call meanwhile; the chunk checks every end
    (:func:`_settled`) before its message is acknowledged. The guard's reports kept
    so far go with it (taken now: the ride may end before the pipeline is sent).
    """
    commands = _end_commands(delivery, process, state, value, attempt)
    if commands is None:
        return Ending(delivery, state, value, attempt, None)
    return Ending(delivery, state, value, attempt, process.ledger.batch.post(commands))


def _end_commands(
    delivery: Delivery, process: _Process, state: str, value: Any, attempt: int | None
) -> Commands | None:
    """The writes of the call's end, for the ledger's next pipeline; ``None``: only the
    result backend can store it, and it did, one write at a time."""
    writer, ledger, config = process.writer(delivery.app), process.ledger, process.config
    if writer is None:
        _one_by_one(delivery, process, delivery.records or [], state, value, attempt)
        return None
    stored = writer.encoded(delivery.task_id, value, state)
    ride = delivery.ride
    reports = [] if ride is None else ride.take_reports()
    return lambda pipe: _queue_end(pipe, ledger, delivery, stored, attempt, config, reports)


def _settled(ending: Ending, process: _Process) -> None:
    """Check a posted end; what did not go in goes now, one write at a time.

    Raises when the result could not be stored (the message is handed back).
    """
    if ending.turn is None:  # stored already
        return
    _check_end(ending, process, process.ledger.batch.try_replies(ending.turn))


def _check_end(ending: Ending, process: _Process, replies: list[Any] | redis.RedisError) -> None:
    """What the end's ``replies`` (or its round trip's error) say; see :func:`_settled`."""
    delivery = ending.delivery
    task_id, records = delivery.task_id, delivery.records or []
    if isinstance(replies, redis.RedisError):
        log.warning("task %s: cannot write its end in one go (%s): one by one", task_id, replies)
    else:
        if records and any(isinstance(reply, Exception) for reply in replies[:-1]):
            log.warning("task %s: cannot record its attempt in the ledger", task_id)
        if not isinstance(replies[-1], Exception):
            return
        log.warning("task %s: cannot store its result (%s): again", task_id, replies[-1])
        records = []  # they went in
    _one_by_one(delivery, process, records, ending.state, ending.value, ending.attempt)


def _one_by_one(
    delivery: Delivery,
    process: _Process,
    records: list[dict[str, Any]],
    state: str,
    value: Any,
    attempt: int | None,
) -> None:
    """The call's end without the ledger's scripts: records, result, ``done``."""
    app = delivery.app
    _write_records(delivery, process, records)
    app.backend.store_result(delivery.task_id, value, state)
    if attempt is not None:
        _finish(app, delivery.task_id, attempt, delivery.offset)


def _queue_end(
    pipe: Pipeline,
    ledger: Ledger,
    delivery: Delivery,
    stored: Stored,
    attempt: int | None,
    config: WorkerConfig,
    reports: Reports,
) -> None:
    task_id = delivery.task_id
    if reports:
        queue_reports(pipe, reports)
    ledger.add_records(pipe, task_id, delivery.records or [], config.attempts_ttl)
    if attempt is None:
        ledger.store_state(pipe, stored)
    else:
        done_ttl = _done_ttl(delivery.app)
        ledger.add_finish(pipe, task_id, attempt, done_ttl, delivery.offset, stored)


def _out_of_time(config: WorkerConfig, timeout: Any, started: float) -> bool:
    """Whether a chunk's call, started now, could outlast the chunk's visibility timeout
    (its longest attempt ending after :data:`CHUNK_SHARE` of it)."""
    if not is_redis(config.broker):
        return False  # RabbitMQ hands a message back when the connection drops, not on a timer
    budget = config.visibility_timeout * CHUNK_SHARE
    deadline = config.attempt_deadline(timeout if isinstance(timeout, (int, float)) else None)
    # A call that could not fit even alone is left to dispatch_call's own check.
    return deadline <= budget and time.monotonic() - started + deadline > budget


def dispatch_call(
    delivery: Delivery,
    call: dict[str, Any],
    attempt: int = 1,
    schedule: Any = None,
    token: str = "",
) -> Any:
    """The per-call path: make attempt ``attempt`` of ``call`` and return its retval.

    ``schedule`` is the message's retry schedule, as it came or already read.

    A final failure raises :class:`CarriedError`; a call that waits in the ledger
    for its next attempt, and a duplicate, raise ``Ignore``; a wait the ledger
    could not record raises ``Reject`` (the message is handed back).
    :func:`dispatch_call_async` is the same path on an event loop: the steps
    are shared, only the take's round trip and the attempt are awaited there.
    """
    process = worker_process(delivery.app)
    spec, retries = _prepared(delivery, process, call, schedule)
    started = offset = None
    if retries is not None:
        started = _started(delivery, process)
        offset = _take(process, delivery, attempt, token, started)
    number = _begun(delivery, retries, attempt, offset, started)
    attempts: list[Attempt] = []
    try:
        with _patience(process, spec, retries):
            retval = process.dispatcher.execute(spec, attempts=attempts)
    except DispatchError as exc:
        failure = exc
    else:
        _record(delivery, process, _records(delivery, attempts, number))
        return retval
    raise _failed(delivery, process, spec, retries, attempt, number, failure, attempts)


async def dispatch_call_async(
    delivery: Delivery,
    runner: ChunkLoop,
    call: dict[str, Any],
    attempt: int,
    schedule: Any,
    token: str,
) -> Any:
    """:func:`dispatch_call` on ``runner``'s event loop, with its AsyncDispatcher."""
    process = worker_process(delivery.app)
    spec, retries = _prepared(delivery, process, call, schedule)
    started = offset = None
    if retries is not None:
        started = _started(delivery, process)
        commands = _take_commands(process, delivery, attempt, token, started)
        offset = _taken(delivery, attempt, await runner.batch.try_run(commands))
    number = _begun(delivery, retries, attempt, offset, started)
    attempts: list[Attempt] = []
    try:
        with _patience(process, spec, retries):
            retval = await runner.dispatcher.execute(spec, attempts=attempts)
    except DispatchError as exc:
        failure = exc
    else:
        _record(delivery, process, _records(delivery, attempts, number))
        return retval
    raise _failed(delivery, process, spec, retries, attempt, number, failure, attempts)


def _prepared(
    delivery: Delivery, process: _Process, call: dict[str, Any], schedule: Any
) -> tuple[Call, RetrySchedule | None]:
    """The call and its schedule, read and checked; unreadable, the call's end (raised)."""
    try:
        spec = Call.from_dict({**call, "task_id": call.get("task_id") or delivery.task_id})
        retries: RetrySchedule | None = schedule
        if schedule is not None and not isinstance(schedule, RetrySchedule):
            retries = RetrySchedule.from_dict(schedule)
        process.config.check_deadline(spec.timeout)
    except DispatchError as exc:
        raise _carried(exc) from None
    return spec, retries


def _begun(
    delivery: Delivery,
    retries: RetrySchedule | None,
    attempt: int,
    offset: int | None,
    started: Stored | None,
) -> int:
    """The attempt is this message's to make: ``STARTED`` shown (unless the take stored
    it), and the attempt's number in the call (a replayed call's go on after the old)."""
    if retries is None:
        offset = 0
        if delivery.ride is not None:
            delivery.ride.ahead = None  # no take to ride on: the dispatcher asks the guard
    delivery.offset = offset
    if started is None or offset is None:  # else the take stored it
        _set_state(delivery, "STARTED", _started_meta(delivery))
    return attempt + (offset or 0)


def _patience(
    process: _Process, spec: Call, retries: RetrySchedule | None
) -> contextlib.AbstractContextManager[None]:
    """With a schedule, a long wait for a slot at the origin defers the call instead (before
    the wait would outlast the call's timeout, a DispatchTimeout that spends an attempt)."""
    if retries is None:
        return contextlib.nullcontext()
    config = process.config
    return deferrable(min(config.endpoint_wait, spec.timeout or config.core.timeout))


def _ignore() -> Exception:
    """Celery's ``Ignore``: the message is acknowledged, the call goes on in the ledger."""
    ignored: Exception = Ignore()
    return ignored


def _failed(
    delivery: Delivery,
    process: _Process,
    spec: Call,
    retries: RetrySchedule | None,
    attempt: int,
    number: int,
    failure: DispatchError,
    attempts: list[Attempt],
) -> Exception:
    """What follows a failed attempt (attempt ``attempt`` of the message, ``number`` of the
    call), and the exception that ends the delivery: ``Ignore`` once the next attempt is
    scheduled, or the call's end as a :class:`CarriedError` (kept as a dead letter first
    when its schedule ran out on failures worth retrying). ``Reject`` is raised when the
    ledger could not record it."""
    back = None if retries is None else deferred_until(failure, time.time())
    if retries is not None and back is not None:  # nothing was sent: no attempt spent
        _schedule_next(delivery, process, spec, retries, attempt, back, failure, [])
        return _ignore()
    records = _records(delivery, attempts, number)
    wait = None if retries is None else retries.wait_after(attempt, failure)
    if retries is None or wait is None:
        # A disabled URL's call waits as a dead letter, to be replayed once it is enabled.
        gone = isinstance(failure, EndpointDisabledError)
        if retries is not None and (retries.retryable(failure) or gone):
            _bury(delivery, process, spec, retries, number, failure, records)
        else:
            _record(delivery, process, records)
            if retries is not None:
                log.info(
                    "task %s: attempt %d failed for good: %s", delivery.task_id, number, failure
                )
        return _carried(failure)
    due = time.time() + wait
    _schedule_next(delivery, process, spec, retries, attempt + 1, due, failure, records)
    return _ignore()


def _schedule_next(
    delivery: Delivery,
    process: _Process,
    spec: Call,
    retries: RetrySchedule,
    attempt: int,
    due: float,
    error: DispatchError,
    records: list[dict[str, Any]],
) -> None:
    """Make the next attempt durable before the message of this one is acknowledged.

    ``RETRY`` is written first: once the ledger holds the call, the next attempt
    may start (and write its own state) at any moment.
    """
    task_id = delivery.task_id
    if delivery.ride is not None:  # the attempt's report goes before its wait is recorded
        delivery.ride.flush()
    _set_state(delivery, "RETRY", Waiting(due, attempt))
    config = process.config
    try:
        process.ledger.wait(
            task_id, spec.to_dict(), retries.to_dict(), delivery.queue, attempt, due,
            error.to_dict(), records, config.attempts_ttl,
        )  # fmt: skip
    except redis.RedisError as exc:
        # Not acknowledged: the broker delivers this attempt again. Repeated, never lost.
        log.error("task %s: the ledger is unreachable (%s): attempt handed back", task_id, exc)
        raise Reject(str(exc), requeue=True) from None
    log.info(
        "task %s: %s; attempt %d of %d due in %.1fs",
        task_id, type(error).__name__, attempt, retries.attempts, due - time.time(),
    )  # fmt: skip


def _bury(
    delivery: Delivery,
    process: _Process,
    spec: Call,
    retries: RetrySchedule,
    number: int,
    error: DispatchError,
    records: list[dict[str, Any]],
) -> None:
    """Keep the call as a dead letter before its FAILURE is stored: a caller that sees one
    finds the other."""
    task_id = delivery.task_id
    if delivery.ride is not None:  # the attempt's report goes before its dead letter
        delivery.ride.flush()
    config = process.config
    try:
        bury(
            process.ledger, task_id, spec.to_dict(), retries.to_dict(), delivery.queue, number,
            error.to_dict(), records, config.attempts_ttl, config.dead_letter_ttl,
        )  # fmt: skip
    except redis.RedisError as exc:
        # Not acknowledged: the broker delivers this attempt again. Repeated, never lost.
        log.error("task %s: the ledger is unreachable (%s): attempt handed back", task_id, exc)
        raise Reject(str(exc), requeue=True) from None
    log.warning(
        "task %s: %s on attempt %d, the schedule's last: kept as a dead letter",
        task_id, type(error).__name__, number,
    )  # fmt: skip


def _record(delivery: Delivery, process: _Process, records: list[dict[str, Any]]) -> None:
    """Add the records of the call's last attempt, before its result is stored.

    A chunk's call keeps them for :func:`_settle`, which writes them with its result.
    """
    if delivery.settles:
        delivery.records = records
    else:
        _write_records(delivery, process, records)


def _write_records(delivery: Delivery, process: _Process, records: list[dict[str, Any]]) -> None:
    try:
        process.ledger.record(delivery.task_id, records, process.config.attempts_ttl)
    except redis.RedisError as exc:  # the records are worth less than the result
        log.warning("task %s: cannot record its attempt in the ledger: %s", delivery.task_id, exc)


def _records(delivery: Delivery, attempts: list[Attempt], number: int) -> list[dict[str, Any]]:
    """The records of this delivery's attempt (one), numbered in the call, named for the worker.

    ``worker`` is the Celery worker's node name and the pool process: ``name@host:pid``.
    """
    node = delivery.hostname
    return [
        replace(
            attempt,
            number=number + attempt.number - 1,
            worker=f"{node}:{os.getpid()}" if node else attempt.worker,
        ).to_dict()
        for attempt in attempts
    ]


def _queue(task: celery.Task) -> str:
    """The queue the message came by: the next attempt (or a replay) goes the same way."""
    delivered_to = (task.request.delivery_info or {}).get("routing_key")
    return str(delivered_to or task.app.conf.task_default_queue)


def _take(
    process: _Process, delivery: Delivery, attempt: int, token: str, started: Stored | None
) -> int | None:
    """The call's offset if this message runs its attempt (``None``: offset unknown).

    ``started`` is stored if it does, in the same script, and the call's admission
    by the endpoint guard is asked for in the same round trip (``delivery.ride``).
    A duplicate is dropped here (``Ignore``).
    """
    commands = _take_commands(process, delivery, attempt, token, started)
    return _taken(delivery, attempt, process.ledger.batch.try_run(commands))


def _take_commands(
    process: _Process, delivery: Delivery, attempt: int, token: str, started: Stored | None
) -> Commands:
    task_id, ledger, ride = delivery.task_id, process.ledger, delivery.ride

    def commands(pipe: Pipeline) -> None:
        ledger.add_take(pipe, task_id, attempt, token, started)
        if ride is not None:
            ride.queue_admission(pipe)

    return commands


def _taken(delivery: Delivery, attempt: int, replies: list[Any] | redis.RedisError) -> int | None:
    """What the take's ``replies`` (or the error of its round trip) say: see :func:`_take`."""
    task_id, ride = delivery.task_id, delivery.ride
    try:
        if isinstance(replies, redis.RedisError):
            raise replies
        took, *admitted = replies
        if ride is not None and admitted:  # nothing queued when nothing was to be asked
            ride.admitted(admitted[0])
        if isinstance(took, Exception):
            raise took
        offset = taken_offset(took)
    except redis.RedisError as exc:
        # Without the ledger, running the attempt is the safe side (at least once).
        log.warning("task %s: cannot read the ledger (%s): attempt runs", task_id, exc)
        return None
    if offset is None:
        log.warning(
            "task %s: a copy of attempt %d that is taken or over: dropped", task_id, attempt
        )
        raise Ignore()
    return offset


def _encoded(delivery: Delivery, process: _Process, state: str, meta: Any) -> Stored | None:
    """``state`` as the ledger's scripts can store it; ``None``: only the backend can."""
    writer = process.writer(delivery.app)
    if writer is None:
        return None
    try:
        return writer.encoded(delivery.task_id, meta, state)
    except Exception as exc:  # the backend's own store_result will say it
        log.debug("task %s: state %s left to the backend: %s", delivery.task_id, state, exc)
        return None


def _started(delivery: Delivery, process: _Process) -> Stored | None:
    """:func:`_encoded` of ``STARTED``: the process and worker that run the attempt."""
    return _encoded(delivery, process, "STARTED", _started_meta(delivery))


def _started_meta(delivery: Delivery) -> dict[str, Any]:
    return {"pid": os.getpid(), "hostname": delivery.hostname}


def _set_state(delivery: Delivery, state: str, meta: Any) -> None:
    """Show ``state`` in the result backend; the ledger, not the state, keeps the call."""
    process = worker_process(delivery.app)
    stored = _encoded(delivery, process, state, meta)
    if stored is not None:
        ledger = process.ledger
        try:
            ledger.batch.run(lambda pipe: ledger.store_state(pipe, stored))
        except redis.RedisError as exc:
            log.debug("task %s: state %s left to the backend: %s", delivery.task_id, state, exc)
        else:
            return
    try:
        delivery.app.backend.store_result(delivery.task_id, meta, state)
    except Exception as exc:  # any backend's error: a state is worth less than the call
        log.warning("task %s: cannot store state %s: %s", delivery.task_id, state, exc)


def _finish(app: celery.Celery, task_id: str, attempt: int, offset: int | None) -> None:
    """Mark the call done in the ledger, once its result is stored."""
    try:
        worker_process(app).ledger.finish(task_id, attempt, _done_ttl(app), offset)
    except redis.RedisError as exc:
        log.warning("task %s: cannot record its end in the ledger: %s", task_id, exc)


def _carried(exc: DispatchError) -> CarriedError:
    return CarriedError(json.dumps(exc.to_dict()))


def _done_ttl(app: celery.Celery) -> float:
    expires = app.conf.result_expires
    if isinstance(expires, timedelta):
        return expires.total_seconds()
    return float(expires) if expires else DEFAULT_DONE_TTL
