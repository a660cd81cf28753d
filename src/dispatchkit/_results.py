"""AsyncResult: the handle of a call submitted to the local executor."""

from __future__ import annotations

import concurrent.futures
import logging
import traceback as tb
from collections.abc import Callable, Sequence
from typing import Any

from dispatchkit._models import Attempt
from dispatchkit.exceptions import ResultTimeout
from dispatchkit.states import FAILURE, PENDING, STARTED, SUCCESS

log = logging.getLogger("dispatchkit")


class AsyncResult:
    """A submitted call, Celery-style: ``id``, ``state``, ``get()``, ``ready()``...

    ``future`` is the underlying :class:`concurrent.futures.Future`, so results
    compose with ``concurrent.futures.wait``/``as_completed`` and with asyncio
    (``asyncio.wrap_future``). ``attempts`` is the list the call appends its
    attempts' records to (``Dispatcher.execute(call, attempts=...)``), if any.
    """

    __slots__ = ("_attempts", "future", "id")

    def __init__(
        self,
        task_id: str,
        future: concurrent.futures.Future[Any],
        attempts: Sequence[Attempt] = (),
    ) -> None:
        self.id = task_id
        self.future = future
        self._attempts = attempts

    @property
    def attempts(self) -> tuple[Attempt, ...]:
        """The records of the call's attempts so far, oldest first (also while it runs)."""
        return tuple(self._attempts)

    @property
    def state(self) -> str:
        """``PENDING`` (queued), ``STARTED`` (running), ``SUCCESS`` or ``FAILURE``."""
        future = self.future
        if future.done():
            return FAILURE if future.cancelled() or future.exception() else SUCCESS
        return STARTED if future.running() else PENDING

    def ready(self) -> bool:
        """True once the call has finished, successfully or not."""
        return self.future.done()

    def successful(self) -> bool:
        return self.state == SUCCESS

    def failed(self) -> bool:
        return self.state == FAILURE

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the call and return its retval.

        With ``timeout`` (seconds), raise :class:`~dispatchkit.ResultTimeout`
        when the call has not finished by then; the call goes on. A failed
        call raises its error, or returns it with ``propagate=False``. Without
        a timeout the wait is still bounded: every call is, by its own timeout
        and retry budget.
        """
        try:
            exc = self.future.exception(timeout)
        except concurrent.futures.TimeoutError:
            raise ResultTimeout(
                f"task {self.id} did not finish within {timeout}s; it is still {self.state}"
            ) from None
        except concurrent.futures.CancelledError as cancelled:
            raise ResultTimeout(f"task {self.id} was cancelled") from cancelled
        if exc is None:
            return self.future.result()
        if propagate:
            raise exc
        return exc

    @property
    def result(self) -> Any:
        """The retval, or the error of a failed call; ``None`` while not ready."""
        future = self.future
        if not future.done() or future.cancelled():
            return None
        return future.exception() or future.result()

    @property
    def traceback(self) -> str | None:
        """The formatted traceback of a failed call, else ``None``."""
        error = self.result if self.failed() else None
        if not isinstance(error, BaseException):
            return None
        return "".join(tb.format_exception(type(error), error, error.__traceback__))

    def add_done_callback(self, fn: Callable[[AsyncResult], object]) -> None:
        """Call ``fn(self)`` when the call finishes (at once if it has)."""

        def done(_: concurrent.futures.Future[Any]) -> None:
            try:
                fn(self)
            except Exception:
                log.exception("a done callback failed for task %s", self.id)

        self.future.add_done_callback(done)

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id} {self.state}>"
