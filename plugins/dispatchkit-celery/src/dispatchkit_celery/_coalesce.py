"""Group commit: the Redis commands of many threads, in one round trip.

A chunk's calls run on up to ``pool_maxsize`` threads of one worker process,
and each call writes to Redis at its start and at its end (the ledger, its
state, the endpoint guard). Alone, that is a round trip per write; through a
:class:`Coalescer`, the threads that want Redis at the same moment share one
pipeline: the first one sends it, the others queue theirs meanwhile, and the
next of them sends everything that queued up. One thread alone (a message
with one call) still makes exactly one round trip per write, and waits for
nobody.

A thread that needs no reply yet (a call of a chunk storing its end) posts
its commands instead (:meth:`Coalescer.post`) and goes on; the thread sending
carries them, and the outcome is read later (:meth:`Coalescer.replies`). Only
a thread waiting for its replies is handed the lead; a sender that finds only
posted commands queued sends them itself.

Each thread gets back the replies of its own commands only, or the error of
its own commands: the pipeline is not a transaction, the commands run in the
order they were queued, and a script's error fails only the thread that
queued it.

Lua scripts (:class:`Script`) go by their SHA1 (``EVALSHA``), not their text:
a coalescer loads every script into Redis before its first pipeline, and again
after Redis answered ``NOSCRIPT`` (it restarted, or its scripts were flushed;
the command that got it failed, as on any Redis error). redis-py's own
``Script`` would ask ``SCRIPT EXISTS`` before every pipeline: a round trip more.

On an event loop, :class:`LoopBatch` does the same for coroutines: the commands
queued while the loop runs its ready coroutines go in one pipeline, sent by a
callback the loop runs next.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.client import Pipeline

#: Queues one thread's commands on a pipeline.
Commands = Callable[[Pipeline], object]


class Script:
    """A Lua script that coalescers load, queued on their pipelines by its SHA1."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
        _SCRIPTS.append(self)

    def queue(self, pipe: Pipeline, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Queue a call of this script on ``pipe`` (one of a :class:`Coalescer`'s)."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


#: Every script made: each coalescer loads them all (a few kB, once).
_SCRIPTS: list[Script] = []


class _Gate:
    """Opened once by one thread, waited for by another: an ``Event`` without its
    ``Condition`` (a lock allocated on every wait, a notify on every set), which cost
    a call of a chunk more than the rest of its hand-offs."""

    __slots__ = ("_lock", "_open")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # closed: wait() blocks until open()
        self._open = False

    def open(self) -> None:
        if not self._open:  # a turn is opened at most twice, by threads one after another
            self._open = True
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        """Whether the gate opened within ``timeout`` seconds."""
        return self._open or self._lock.acquire(timeout=timeout)


class Turn:
    """One thread's commands, waiting for a pipeline to carry them.

    ``waits``: a thread waits for the replies (:meth:`Coalescer.run`), and may be
    handed the lead; else they were posted (:meth:`Coalescer.post`), and are read
    later with :meth:`Coalescer.replies`.
    """

    __slots__ = ("commands", "done", "error", "lead", "replies", "waits")

    def __init__(self, commands: Commands, waits: bool) -> None:
        self.commands = commands
        self.waits = waits
        self.done = _Gate()
        self.lead = False  # set (with done) when this thread is to send the next pipeline
        self.replies: list[Any] = []
        self.error: BaseException | None = None


class Coalescer:
    """Runs the commands of concurrent threads on ``client``, one pipeline per round trip.

    ``patience``: seconds a thread waits for another thread's pipeline to carry
    its commands (a bound on top of the client's own socket timeout, which
    bounds every round trip).
    """

    def __init__(self, client: redis.Redis, patience: float = 60.0) -> None:
        self.client = client
        self.patience = patience
        self._lock = threading.Lock()
        self._queued: list[Turn] = []
        self._sending = False
        self._loaded = 0  # how many of _SCRIPTS Redis has, as far as this coalescer knows

    def run(self, commands: Commands, *, raise_errors: bool = True) -> list[Any]:
        """The replies of the commands ``commands`` queues, in order.

        The first error among them is raised (a ``redis.RedisError``, as the
        command alone would raise it); with ``raise_errors=False`` a failed
        command's reply is its error. A failed round trip raises in any case.
        """
        turn = Turn(commands, waits=True)
        if not self._queue(turn):
            lead = self._wait(turn)
            if lead:
                self._send()
        return self._outcome(turn, raise_errors)

    def post(self, commands: Commands) -> Turn:
        """Queue ``commands`` for the next pipeline without waiting for its replies.

        When no other thread is sending, this one sends now (and waits for that
        round trip); else the sending thread carries them. :meth:`replies` reads
        their outcome later.
        """
        turn = Turn(commands, waits=False)
        self._queue(turn)
        return turn

    def replies(self, turn: Turn, *, raise_errors: bool = True) -> list[Any]:
        """The replies of a posted ``turn``, as :meth:`run` gives them (waiting if need be)."""
        self._wait(turn)  # never handed the lead: only a thread in run() is
        return self._outcome(turn, raise_errors)

    def try_run(self, commands: Commands) -> list[Any] | redis.RedisError:
        """:meth:`run` without raising: each command's reply (a failed one's is its error),
        or the error of a round trip that failed."""
        try:
            return self.run(commands, raise_errors=False)
        except redis.RedisError as exc:
            return exc

    def try_replies(self, turn: Turn) -> list[Any] | redis.RedisError:
        """:meth:`replies` of a posted ``turn`` without raising, as :meth:`try_run`."""
        try:
            return self.replies(turn, raise_errors=False)
        except redis.RedisError as exc:
            return exc

    def _queue(self, turn: Turn) -> bool:
        """Queue ``turn``; ``True``: this thread was to send, and has sent it."""
        with self._lock:
            self._queued.append(turn)
            lead = not self._sending
            self._sending = True
        if lead:
            self._send()
        return lead

    @staticmethod
    def _outcome(turn: Turn, raise_errors: bool) -> list[Any]:
        if turn.error is not None:
            raise turn.error
        for reply in turn.replies if raise_errors else ():
            if isinstance(reply, Exception):
                raise reply
        return turn.replies

    def _wait(self, turn: Turn) -> bool:
        """Wait until another thread's pipeline carried ``turn``; ``True``: lead instead."""
        if turn.done.wait(self.patience):
            return turn.lead
        with self._lock:
            if turn.lead:  # handed the lead just now: the others wait for this thread
                return True
            if turn in self._queued:  # never sent: withdrawn, nothing of it ran
                self._queued.remove(turn)
                raise redis.TimeoutError(
                    f"no pipeline carried these commands within {self.patience:g}s"
                )
        # On its way in a pipeline whose round trip the client's socket timeout bounds.
        if not turn.done.wait(self.patience):
            raise redis.TimeoutError(f"no reply to these commands within {self.patience:g}s")
        return False

    def _send(self) -> None:
        """Send what is queued (this thread's turn among it), then hand the lead on to a
        thread waiting for its replies; when only posted commands queued up meanwhile,
        send them too."""
        while True:
            with self._lock:
                turns, self._queued = self._queued, []
            failed = True
            try:
                self._carry(turns)
                failed = False
            finally:
                done = self._hand_on(failed)
            if done:
                return

    def _hand_on(self, failed: bool) -> bool:
        """After a pipeline: ``True`` when this thread is done sending."""
        with self._lock:
            if not self._queued:
                self._sending = False
                return True
            following = next((turn for turn in self._queued if turn.waits), None)
            if following is not None:
                following.lead = True
                following.done.open()
                return True
            if failed:  # unexpected: whoever queues next sends what is left
                self._sending = False
                return True
            return False

    def _carry(self, turns: list[Turn]) -> None:
        spans: list[tuple[Turn, int, int]] = []
        try:
            self._load_scripts()
        except BaseException as exc:  # the round trip failed: every turn waiting did
            for turn in turns:
                turn.error = exc
                turn.done.open()
            return
        with self.client.pipeline(transaction=False) as pipe:
            for turn in turns:
                start = len(pipe)
                try:
                    turn.commands(pipe)
                except Exception as exc:  # a bad command: that turn's error, not the others'
                    del pipe.command_stack[start:]
                    turn.error = exc
                    continue
                spans.append((turn, start, len(pipe)))
            try:
                replies = pipe.execute(raise_on_error=False) if spans else []
            except BaseException as exc:  # the round trip failed: every turn in it did
                for turn, _, _ in spans:
                    turn.error = exc
                replies = []
        if any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
            self._loaded = 0  # Redis lost them: loaded again before the next pipeline
        for turn, start, end in spans:
            if turn.error is None:
                turn.replies = replies[start:end]
        for turn in turns:
            turn.done.open()

    def _load_scripts(self) -> None:
        if self._loaded == len(_SCRIPTS):
            return
        scripts = list(_SCRIPTS)
        with self.client.pipeline(transaction=False) as pipe:
            for script in scripts:
                pipe.script_load(script.text)
            pipe.execute()
        self._loaded = len(scripts)


class LoopBatch:
    """A :class:`Coalescer`'s pipelines for the coroutines of one event loop.

    The commands the coroutines queue while the loop runs them go in one
    pipeline, sent by a callback the loop runs once they are all waiting: a
    round trip that blocks the loop's thread, for replies that every coroutine
    queued in it waits for anyway. Only ever used from the loop's own thread.
    """

    def __init__(self, coalescer: Coalescer) -> None:
        self._coalescer = coalescer
        self._queued: list[tuple[Turn, asyncio.Future[None]]] = []

    async def run(self, commands: Commands, *, raise_errors: bool = True) -> list[Any]:
        """:meth:`Coalescer.run` for a coroutine: the replies of ``commands``, in order."""
        loop = asyncio.get_running_loop()
        turn, carried = Turn(commands, waits=True), loop.create_future()
        self._queued.append((turn, carried))
        if len(self._queued) == 1:
            loop.call_soon(self._send)
        await carried
        return Coalescer._outcome(turn, raise_errors)

    async def try_run(self, commands: Commands) -> list[Any] | redis.RedisError:
        """:meth:`Coalescer.try_run` for a coroutine."""
        try:
            return await self.run(commands, raise_errors=False)
        except redis.RedisError as exc:
            return exc

    def _send(self) -> None:
        queued, self._queued = self._queued, []
        try:
            self._coalescer._carry([turn for turn, _ in queued])
        finally:
            for _, carried in queued:
                if not carried.done():  # a coroutine cancelled meanwhile has no one waiting
                    carried.set_result(None)
