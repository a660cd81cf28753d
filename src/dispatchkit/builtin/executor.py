"""Built-in executor: a thread pool in this process.

Sized to the transport's pool (``pool_maxsize``) unless ``executor_threads``
says otherwise: more threads than pooled connections per host would only
queue for a connection. On ``close()`` the Dispatcher waits for every call
already submitted to finish; nothing is dropped (each call is bounded by its
timeout and retry budget, so the wait is too).
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from dispatchkit._checks import count
from dispatchkit._models import Attempt, Call
from dispatchkit._results import AsyncResult
from dispatchkit.exceptions import UsageError
from dispatchkit.hookspecs import hookimpl

if TYPE_CHECKING:
    from dispatchkit._dispatcher import Dispatcher
    from dispatchkit._settings import Settings


NAME = "threads"


class ThreadExecutor:
    """Runs calls on a pool of threads, each through ``dispatcher.execute``."""

    def __init__(self, dispatcher: Dispatcher, threads: int) -> None:
        self._dispatcher = dispatcher
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dispatchkit")
        self.threads = threads

    def submit(self, call: Call) -> AsyncResult:
        attempts: list[Attempt] = []  # filled on the pool's thread, read through the result
        # The call runs in the submitter's context (as an asyncio task would): its context
        # variables, a tracing span for one, reach the hooks on the pool's thread.
        context = contextvars.copy_context()
        try:
            future = self._pool.submit(
                context.run, self._dispatcher.execute, call, attempts=attempts
            )
        except RuntimeError as exc:  # submitted after shutdown
            raise UsageError(f"the executor is shut down: {exc}") from exc
        return AsyncResult(call.task_id, future, attempts)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait)


class Plugin:
    name = "executor"

    def __init__(self) -> None:
        self._threads: int | None = None

    @hookimpl(trylast=True)
    def dispatchkit_configure(self, settings: Settings) -> None:
        threads = settings.extra("executor_threads")
        if threads is not None:
            count(threads, "setting 'executor_threads'")
        self._threads = threads

    @hookimpl(trylast=True)
    def dispatchkit_executor(self, dispatcher: Dispatcher) -> ThreadExecutor | None:
        if dispatcher.settings.executor != NAME:
            return None
        return ThreadExecutor(dispatcher, self._threads or dispatcher.settings.pool_maxsize)
