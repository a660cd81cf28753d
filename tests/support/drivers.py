"""One blocking interface over both dispatchers, so that one test runs against each.

:class:`SyncClient` wraps a :class:`~dispatchkit.Dispatcher`;
:class:`AsyncClient` wraps an :class:`~dispatchkit.AsyncDispatcher` and runs
each call to completion on an event loop of its own (one loop for the
client's whole life: an AsyncDispatcher is bound to the loop that first used
it). Between calls the loop does not run, so :meth:`Client.pause` runs it for
the time given: the AsyncDispatcher then sees what arrives on its idle
connections (a FIN, a RST) as it would in an application whose loop never
stops. A test written against :class:`Client` cannot tell the two apart, so
a fault table parametrized over :data:`DRIVERS` holds both to one behaviour.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol, TypeVar

from dispatchkit import AsyncDispatcher, Dispatcher

__all__ = ["DRIVERS", "AsyncClient", "Client", "SyncClient", "make_client"]

T = TypeVar("T")

#: The names of the drivers, as test ids.
DRIVERS = ("sync", "async")


class Client(Protocol):
    """What a driver-agnostic test calls."""

    name: str

    def call(self, url: str, /, method: str = "GET", **kwargs: Any) -> Any: ...

    def apply(
        self,
        url: str,
        method: str = "GET",
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        task_id: str | None = None,
        json: bool = False,
    ) -> Any: ...

    def pause(self, seconds: float) -> None:
        """Let ``seconds`` pass (the AsyncDispatcher's loop runs meanwhile)."""
        ...

    def close(self) -> None: ...


class SyncClient:
    name = "sync"

    def __init__(self, **settings: Any) -> None:
        self.dispatcher = Dispatcher(**settings)

    def call(self, url: str, /, method: str = "GET", **kwargs: Any) -> Any:
        return self.dispatcher.call(url, method, **kwargs)

    def apply(
        self,
        url: str,
        method: str = "GET",
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        task_id: str | None = None,
        json: bool = False,
    ) -> Any:
        return self.dispatcher.apply(
            url, method, kwargs, timeout=timeout, headers=headers, task_id=task_id, json=json
        )

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        self.dispatcher.close()


class AsyncClient:
    name = "async"

    def __init__(self, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.dispatcher = AsyncDispatcher(**settings)
        except BaseException:
            self.loop.close()
            raise

    def run(self, step: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await step

        return self.loop.run_until_complete(wrapped())

    def call(self, url: str, /, method: str = "GET", **kwargs: Any) -> Any:
        return self.run(self.dispatcher.call(url, method, **kwargs))

    def apply(
        self,
        url: str,
        method: str = "GET",
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        task_id: str | None = None,
        json: bool = False,
    ) -> Any:
        return self.run(
            self.dispatcher.apply(
                url, method, kwargs, timeout=timeout, headers=headers, task_id=task_id, json=json
            )
        )

    def pause(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(self.dispatcher.aclose())
            self.run(asyncio.sleep(0))  # the transports' connection_lost callbacks
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()


def make_client(driver: str, **settings: Any) -> Client:
    """A client of ``driver`` (``"sync"`` or ``"async"``) with ``settings``."""
    if driver == "sync":
        return SyncClient(**settings)
    if driver == "async":
        return AsyncClient(**settings)
    raise ValueError(f"unknown driver {driver!r}")
