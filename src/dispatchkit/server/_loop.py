"""The event loop on which a TaskApp runs its async tasks for WSGI requests.

Under ASGI an async task is awaited on the server's own loop. A WSGI request
arrives on a plain thread, with no loop, so TaskApp keeps **one event loop per
app, in a daemon thread**, and hands each call to it with
:func:`asyncio.run_coroutine_threadsafe`; the request's thread waits for the
answer. Why not ``asyncio.run`` per call:

- the app's async tasks share one loop, as they do under an ASGI server: a
  client session or a connection pool that one call creates (and caches) is
  still usable by the next, and asyncio objects shared between calls (a lock,
  an event, a queue) work. With ``asyncio.run`` every call has a loop of its
  own, closed when it returns, and anything bound to a loop breaks on the
  next call;
- no loop (and no default executor) is built and torn down per request;
- calls from many request threads interleave on the one loop while they await.

The loop starts with the first async task a WSGI request calls (an app that
never calls one starts no thread), and :meth:`LoopThread.close` ends it: it
lets running coroutines finish for :data:`CLOSE_GRACE` seconds, cancels the
rest, shuts down async generators and the loop's default executor, closes the
loop and joins the thread, every wait bounded. ``TaskApp.close()`` calls it;
so does the garbage collector, for an app dropped without being closed. A
later call starts a new loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["CLOSE_GRACE", "LoopClosed", "LoopThread"]

logger = logging.getLogger("dispatchkit.server")

T = TypeVar("T")

#: Seconds :meth:`LoopThread.close` lets running coroutines finish before cancelling them.
CLOSE_GRACE = 5.0
# Seconds cancelled coroutines, async generators and the default executor get to end.
_CANCEL_WAIT = 2.0
# How often a waiting request checks that its loop still runs.
_POLL = 0.5


class LoopClosed(Exception):
    """The coroutine did not finish: it was cancelled, or its loop stopped under it."""


class LoopThread:
    """An event loop running in a daemon thread, started on first use; thread-safe."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``make()`` on the loop and wait for its result in this thread.

        Waits as long as the coroutine runs, but not past its loop: raises
        :class:`LoopClosed` when it is cancelled (by :meth:`close`) or the
        loop's thread has ended.
        """
        with self._lock:
            loop, thread = self._started()
            if threading.current_thread() is thread:
                raise RuntimeError("LoopThread.run() called from its own event loop")
            future = asyncio.run_coroutine_threadsafe(make(), loop)
        while not future.done():
            concurrent.futures.wait((future,), timeout=_POLL)
            if not future.done() and not thread.is_alive():
                future.cancel()
                raise LoopClosed("the event loop stopped while the task ran")
        if future.cancelled():
            raise LoopClosed("the task was cancelled")
        return future.result()

    def _started(self) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=_serve, args=(loop,), name=self.name, daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        return self._loop, self._thread

    def close(self, grace: float | None = None) -> None:
        """Stop the loop: running coroutines get ``grace`` seconds (:data:`CLOSE_GRACE`),
        then are cancelled; the loop is closed and its thread joined, all bounded.

        Safe to call twice, and from a coroutine on the loop itself (it then
        only asks the loop to stop). A later :meth:`run` starts a new loop.
        """
        grace = CLOSE_GRACE if grace is None else grace
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or not thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(_wind_down(grace), loop)
        except RuntimeError:  # the loop closed in the meantime
            return
        if threading.current_thread() is thread:
            return  # a coroutine on this loop closed it: it stops once that returns
        thread.join(grace + 3 * _CANCEL_WAIT + 1.0)
        if thread.is_alive():
            logger.warning(
                "the event loop thread %r did not stop: an async task blocks it", self.name
            )


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The loop thread: run until :func:`_wind_down` stops the loop, then close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        loop.run_until_complete(_finish(loop))
    except Exception:
        logger.exception("the event loop thread failed")
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def _wind_down(grace: float) -> None:
    """Let the other tasks finish within ``grace`` seconds, then stop the loop."""
    current = asyncio.current_task()
    running = [task for task in asyncio.all_tasks() if task is not current]
    if running:
        await asyncio.wait(running, timeout=grace)
    asyncio.get_running_loop().stop()


async def _finish(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what still runs; shut down async generators and the default executor."""
    current = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not current]
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left, timeout=_CANCEL_WAIT)
    await loop.shutdown_asyncgens()
    try:
        await asyncio.wait_for(loop.shutdown_default_executor(), _CANCEL_WAIT)
    except asyncio.TimeoutError:
        logger.warning("the event loop's default executor did not shut down in time")
