"""The AsyncDispatcher: the Dispatcher's pipeline, driven by asyncio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sized
from types import TracebackType
from typing import Any

import tenacity

from dispatchkit._checks import each
from dispatchkit._endpoints import Endpoints
from dispatchkit._models import AsyncTransport, Attempt, Call, PluginInfo, Request, Response
from dispatchkit._pipeline import AsyncAfterFailure, Pipeline, plugin_failure, scheme_of
from dispatchkit._redirects import SCHEMES
from dispatchkit._settings import Settings
from dispatchkit.exceptions import DispatchError, UsageError

__all__ = ["AsyncDispatcher"]

_EMPTY: Mapping[str, Any] = {}
_END: Any = object()  # the end of map's calls


class AsyncDispatcher:
    """Calls HTTP callback tasks from asyncio: ``await d.call(url, **kwargs)``.

    Takes the same settings, plugins and ``disable`` as
    :class:`~dispatchkit.Dispatcher`, and raises the same errors: both drive
    one pipeline (building, hooks, answers, retry policy, logging); only
    sending and sleeping differ. Sending is the ``dispatchkit_async_transport``
    hook's, built in on aiohttp (``pip install 'dispatchkit[async]'``).

    Use it from one event loop, as ``async with AsyncDispatcher() as d:`` or
    closing it with ``await d.aclose()``. Cancelling the task that awaits a
    call cancels the call: its connection is dropped, and no result arrives
    later.
    """

    def __init__(
        self,
        *,
        plugins: Iterable[object] = (),
        disable: Iterable[str] = (),
        **settings: Any,
    ) -> None:
        self._pipeline = pipeline = Pipeline(self, settings, plugins, disable)
        self.settings: Settings = pipeline.settings
        policy = pipeline.retrying
        # The same policy (its strategy objects), on asyncio's clock.
        self._retrying = None if policy is None else _async_policy(policy)
        self._transports: dict[str, AsyncTransport] = {}
        self._closed = False
        try:
            for scheme in SCHEMES:  # now, so that a missing aiohttp is said at once
                transport = self._ask_transport(scheme)
                if transport is not None:
                    self._transports[scheme] = transport
        except BaseException:
            pipeline.close_plugins()
            raise

    # -- public API ---------------------------------------------------------------------

    async def call(self, url: str, /, method: str = "GET", **kwargs: Any) -> Any:
        """Call the task at ``url`` with ``kwargs`` and return its ``retval``.

        Raises :class:`~dispatchkit.RemoteExecuteError` when the task reports
        failure, and another :class:`~dispatchkit.DispatchError` when the call
        itself fails. For per-call options use :meth:`apply`.
        """
        return await self._run(self._pipeline.build(Call(url, method, kwargs)))

    async def apply(
        self,
        url: str,
        method: str = "GET",
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        task_id: str | None = None,
        json: bool = False,
        options: Mapping[str, str] | None = None,
    ) -> Any:
        """Like :meth:`call`, with the task's arguments as one mapping and options beside them.

        The options are :meth:`Dispatcher.apply <dispatchkit.Dispatcher.apply>`'s,
        plugin ``options`` included.
        """
        call = Call(url, method, kwargs or _EMPTY, task_id or "", timeout, headers, json, options)
        return await self._run(self._pipeline.build(call))

    async def execute(self, call: Call, *, attempts: list[Attempt] | None = None) -> Any:
        """Run a :class:`~dispatchkit.Call` now.

        With ``attempts``, the record of each attempt (an :class:`~dispatchkit.Attempt`)
        is appended to that list as the attempt ends, whether the call succeeds or not.
        """
        request = self._pipeline.build(call)
        request.attempts = attempts
        return await self._run(request)

    async def map(
        self,
        url: str,
        calls: Iterable[Mapping[str, Any]],
        method: str = "GET",
        *,
        concurrency: int | None = None,
        return_exceptions: bool = False,
        options: Mapping[str, str] | None = None,
    ) -> list[Any]:
        """Call ``url`` once per mapping of arguments in ``calls``; return the retvals in order.

        At most ``concurrency`` calls (default ``pool_maxsize``) are in flight;
        a new one starts as soon as one ends. The first error (in order) is
        raised once the calls in flight have finished, and no new call starts
        after an error; with ``return_exceptions=True`` errors take their place
        in the list instead. Cancelling ``map`` cancels every call in flight.
        ``options`` are every call's (see :meth:`apply`).
        """
        window = concurrency or self.settings.pool_maxsize
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise UsageError(f"concurrency must be a positive int, got {concurrency!r}")
        source = each(calls, "map")
        build = self._pipeline.builder(url, method, options)  # what the calls share, once
        # Every call's URL starts with url's: its transport, looked up once (else per call).
        transport = self._transports.get(url.partition(":")[0]) if isinstance(url, str) else None
        run = self._run
        values: list[Any] = []
        failed = False

        async def worker() -> None:
            # A window of workers, each taking the next call as its last one ends: no task,
            # semaphore or wrapper coroutine per call. One loop, so taking is never raced.
            nonlocal failed
            while not failed:
                kwargs = next(source, _END)
                if kwargs is _END:
                    return
                index = len(values)
                values.append(None)
                try:
                    values[index] = await run(build(kwargs), transport)
                except DispatchError as exc:
                    failed = failed or not return_exceptions
                    values[index] = exc
                except Exception as exc:  # not the pipeline's: raised in its place at the end
                    values[index] = exc
                # The next call starts on the loop's next turn: the answers already in are
                # read first and the requests go out together, as with a task per call
                # (sending each as its answer was read cost more CPU: docs/benchmarks.md).
                await asyncio.sleep(0)

        # A collection says how many calls it holds: no more workers than that.
        count = max(1, min(window, len(calls))) if isinstance(calls, Sized) else window
        workers = [asyncio.ensure_future(worker()) for _ in range(count)]
        try:
            await asyncio.gather(*workers)
        except BaseException:  # cancelled, or taking the next call from ``calls`` failed
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        for value in values:
            if isinstance(value, BaseException) and not (
                return_exceptions and isinstance(value, DispatchError)
            ):
                raise value
        return values

    @property
    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin: name, distribution, version and the hooks it implements."""
        return self._pipeline.plugins

    @property
    def endpoints(self) -> Endpoints:
        """The endpoint guard's state per origin: ``list()``, ``enable(url)``, ``reset(origin)``."""
        return self._pipeline.endpoints

    async def aclose(self) -> None:
        """Close every transport (their connections) and the plugins; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        transports = {id(t): t for t in self._transports.values()}.values()
        self._transports.clear()
        for transport in transports:
            await transport.aclose()
        self._pipeline.close_plugins()

    async def __aenter__(self) -> AsyncDispatcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        names = ", ".join(info.name for info in self._pipeline.infos)
        return f"<AsyncDispatcher plugins=[{names}]{' closed' if self._closed else ''}>"

    # -- sending ----------------------------------------------------------------------

    async def _run(self, request: Request, transport: AsyncTransport | None = None) -> Any:
        """Run ``request`` to its retval; ``transport``, when given, is the one for its scheme."""
        if self._closed:
            raise UsageError("this AsyncDispatcher is closed", request=request)
        pipeline = self._pipeline
        attempt = self._attempt if pipeline.guard is None else self._guarded_attempt
        started = time.perf_counter()
        try:
            if transport is None:
                transport = self._transport_for(request)
            try:
                response = await attempt(request, transport)
            except DispatchError as first:
                if self._retrying is None:
                    raise
                sender = transport
                response = await self._retrying.copy()(
                    AsyncAfterFailure(first, lambda: attempt(request, sender))
                )
            retval = pipeline.retval(request, response)
        except DispatchError as exc:
            pipeline.failed(request, exc, started)
            raise
        pipeline.succeeded(request, retval, started)
        return retval

    async def _attempt(self, request: Request, transport: AsyncTransport) -> Response:
        pipeline = self._pipeline
        pipeline.begin_attempt(request)
        try:
            response = await transport.send(request)
        except DispatchError as exc:
            pipeline.attempt_failed(request, exc)
            raise
        except Exception as exc:
            error = plugin_failure(exc, request)
            pipeline.attempt_failed(request, error)
            raise error from exc
        return pipeline.checked(request, response)

    async def _guarded_attempt(self, request: Request, transport: AsyncTransport) -> Response:
        """:meth:`_attempt` once the endpoint guard admits it (awaiting, never blocking the loop).

        The slot is given back however the attempt ends, a cancellation included.
        """
        pipeline = self._pipeline
        while wait := pipeline.admit(request):
            await asyncio.sleep(wait)
        error: BaseException | None = None
        try:
            return await self._attempt(request, transport)
        except BaseException as exc:
            error = exc
            raise
        finally:
            pipeline.report(request, error)

    def _transport_for(self, request: Request) -> AsyncTransport:
        transport = self._transports.get(request.url.partition(":")[0])
        if transport is not None:
            return transport
        scheme = scheme_of(request)
        transport = self._transports.get(scheme) or self._ask_transport(scheme)
        if transport is None:
            raise UsageError(f"no async transport for scheme {scheme!r}", request=request)
        self._transports[scheme] = transport
        return transport

    def _ask_transport(self, scheme: str) -> AsyncTransport | None:
        transport: AsyncTransport | None = self._pipeline.pm.hook.dispatchkit_async_transport(
            scheme=scheme, dispatcher=self
        )
        return transport


def _async_policy(policy: tenacity.Retrying) -> tenacity.AsyncRetrying:
    """``policy``'s strategies in a tenacity ``AsyncRetrying`` (which sleeps with asyncio)."""
    return tenacity.AsyncRetrying(
        stop=policy.stop,
        wait=policy.wait,
        retry=policy.retry,
        before=policy.before,
        after=policy.after,
        before_sleep=policy.before_sleep,
        reraise=policy.reraise,
        retry_error_cls=policy.retry_error_cls,
        retry_error_callback=policy.retry_error_callback,
    )
