"""The Dispatcher: calls on this thread, or on an executor, through one pipeline."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any

from dispatchkit._checks import each
from dispatchkit._encoding import new_task_id
from dispatchkit._endpoints import Endpoints
from dispatchkit._models import (
    Attempt,
    Call,
    Executor,
    PluginInfo,
    Request,
    Response,
    Result,
    Transport,
)
from dispatchkit._pipeline import TASK_NAME, AfterFailure, Pipeline, plugin_failure, scheme_of
from dispatchkit._settings import Settings
from dispatchkit.exceptions import DispatchError, UsageError

__all__ = ["TASK_NAME", "Dispatcher"]

_EMPTY: Mapping[str, Any] = {}


class Dispatcher:
    """Calls HTTP callback tasks through a pipeline of plugins.

    ``Dispatcher(**settings)`` takes the settings of :class:`~dispatchkit._settings.Settings`
    (``timeout``, ``pool_maxsize``, ``max_response_bytes``, TLS, retry limits, ...)
    and any setting a plugin reads. ``plugins`` are registered after the
    built-ins and the entry-point plugins; ``disable`` names plugins to leave
    out. A Dispatcher is safe to share between threads; close it (or use it as
    a context manager) to release its connections.
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
        self._closing = self._closed = False
        self._lock = threading.Lock()
        self._transports: dict[str, Transport] = {}
        self._executor: Executor | None = None
        # Asked at each submit only when a plugin implements it: otherwise pluggy is not called.
        self._submit_options = (
            pipeline.pm.hook.dispatchkit_submit_options
            if pipeline.implemented("dispatchkit_submit_options")
            else None
        )

    # -- public API ---------------------------------------------------------------

    def call(self, url: str, /, method: str = "GET", **kwargs: Any) -> Any:
        """Call the task at ``url`` with ``kwargs`` and return its ``retval``.

        Raises :class:`~dispatchkit.RemoteExecuteError` when the task reports
        failure, and another :class:`~dispatchkit.DispatchError` when the
        call itself fails. For per-call options use :meth:`apply`.
        """
        return self._run(self._pipeline.build(Call(url, method, kwargs)))

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
        options: Mapping[str, str] | None = None,
    ) -> Any:
        """Like :meth:`call`, with the task's arguments as a mapping and options beside them.

        Because the arguments are one mapping, an option can never collide
        with a task argument. ``timeout`` overrides the setting for this call,
        ``headers`` are added to the request, ``task_id`` is sent as the
        ``Idempotency-Key`` (a uuid4 hex by default), ``json=True`` sends the
        arguments as one JSON object (POST, PUT, PATCH) instead of a form.
        ``options`` are plugin options, names to short strings read by plugins
        where the call is sent and never sent themselves: ``{"signing_key":
        "acme"}`` signs with the key ``acme`` of ``signing_keys``.
        """
        call = Call(url, method, kwargs or _EMPTY, task_id or "", timeout, headers, json, options)
        return self._run(self._pipeline.build(call))

    def execute(self, call: Call, *, attempts: list[Attempt] | None = None) -> Any:
        """Run a :class:`~dispatchkit.Call` here and now; what executors call.

        With ``attempts``, the record of each attempt (an :class:`~dispatchkit.Attempt`)
        is appended to that list as the attempt ends, whether the call succeeds or not.
        """
        request = self._pipeline.build(call)
        request.attempts = attempts
        return self._run(request)

    def submit(self, url: str, /, method: str = "GET", **kwargs: Any) -> Result:
        """Start the call on the executor and return its :class:`~dispatchkit.AsyncResult`.

        Bad arguments raise here, before anything is queued; the result's ``id``
        is the task id sent as ``Idempotency-Key``. For per-call options use
        :meth:`apply_async`.
        """
        return self.apply_async(url, method, kwargs)

    def apply_async(
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
    ) -> Result:
        """Like :meth:`apply`, on the executor: returns at once with the call's result handle.

        The ``options`` travel with the call to wherever the executor runs it
        (a Celery worker), and are resolved there.
        """
        call = Call(
            url, method, kwargs or _EMPTY, task_id or new_task_id(), timeout, headers, json, options
        )
        return self._get_executor().submit(self._checked(call))

    def submit_many(
        self,
        url: str,
        calls: Iterable[Mapping[str, Any]],
        method: str = "GET",
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        json: bool = False,
        options: Mapping[str, str] | None = None,
    ) -> list[Result]:
        """Start one call of ``url`` per mapping of arguments in ``calls``; their handles, in order.

        Each call gets a task id of its own (its ``Idempotency-Key``), and the
        other arguments are every call's (see :meth:`apply_async`). Every call is
        built and checked here before any is queued: a bad one raises and none
        is sent. An executor with a ``submit_many`` method takes them all at once
        (the Celery executor sends them in chunks, one message each); any other
        gets them one by one through ``submit``.
        """
        return self.submit_calls(
            Call(url, method, kwargs, new_task_id(), timeout, headers, json, options)
            for kwargs in each(calls, "submit_many")
        )

    def submit_calls(self, calls: Iterable[Call]) -> list[Result]:
        """Start every :class:`~dispatchkit.Call` of ``calls``; their handles, in order.

        Each call has its own URL, method, arguments, task id (a new one where
        it has none) and options: one event to many receivers goes as one batch.
        Every call is checked here before any is queued (a task id given twice
        is a ``UsageError``): a bad one raises and none is sent. An executor
        with a ``submit_many`` method takes them all at once (the Celery
        executor sends them in chunks, one message each); any other gets them
        one by one through ``submit``.
        """
        checked: list[Call] = []
        ids: set[str] = set()
        for call in each(calls, "submit_calls"):
            if not isinstance(call, Call):
                raise UsageError(f"submit_calls takes dispatchkit.Call objects, got {call!r}")
            if not call.task_id:
                call = replace(call, task_id=new_task_id())
            elif call.task_id in ids:
                raise UsageError(f"task id {call.task_id!r} is given to two calls of one batch")
            ids.add(call.task_id)
            checked.append(self._checked(call))
        executor = self._get_executor()
        many = getattr(executor, "submit_many", None)
        if many is None:
            return [executor.submit(call) for call in checked]
        return list(many(checked))

    def map(
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

        At most ``concurrency`` calls (default ``pool_maxsize``) are in flight at
        once, so a long iterable never queues everything up front. The first
        error (in order) is raised once the calls in flight have finished, and
        no new call starts after it; with ``return_exceptions=True`` errors take
        their place in the list instead. ``options`` are every call's (see :meth:`apply`).
        """
        window = concurrency or self.settings.pool_maxsize
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise UsageError(f"concurrency must be a positive int, got {concurrency!r}")
        pending: deque[Result] = deque()
        values: list[Any] = []
        failed = False
        for kwargs in each(calls, "map"):
            if len(pending) >= window:
                failed = self._collect(pending.popleft(), values, return_exceptions) or failed
                if failed:
                    break
            pending.append(self.apply_async(url, method, kwargs, options=options))
        while pending:
            failed = self._collect(pending.popleft(), values, return_exceptions) or failed
        if failed:
            raise next(v for v in values if isinstance(v, DispatchError))
        return values

    def _checked(self, call: Call) -> Call:
        """``call``, built here only to be checked (method, URL, arguments, headers, options)
        in the caller, before anything is queued; the executor builds it again where it runs."""
        if self._submit_options is not None:
            call = self._with_submit_options(call)
        request = self._pipeline.build(call)
        if call.method == request.method:
            return call
        return Call(
            call.url, request.method, call.kwargs, call.task_id, call.timeout, call.headers,
            call.json, call.options,
        )  # fmt: skip

    def _with_submit_options(self, call: Call) -> Call:
        """``call`` with the options the ``dispatchkit_submit_options`` hooks add, in the caller.

        The caller's own options win; between plugins, the first to answer a name.
        What they add is checked with the rest when the call is built.
        """
        assert self._submit_options is not None
        try:
            answers = self._submit_options(call=call)
        except DispatchError:
            raise
        except Exception as exc:
            error = DispatchError(f"plugin failure: {type(exc).__name__}: {exc}")
            if isinstance(call.url, str):
                error.with_context(call.task_id, str(call.method).upper(), call.url)
            raise error from exc
        added: dict[str, str] = {}
        for options in answers:
            if not isinstance(options, Mapping):
                raise UsageError(
                    f"dispatchkit_submit_options returned {type(options).__name__}, "
                    "not a mapping of option names to str"
                )
            for name, value in options.items():
                added.setdefault(name, value)
        if not added:
            return call
        if call.options:
            added.update(call.options)
        return replace(call, options=added)

    @staticmethod
    def _collect(result: Result, values: list[Any], return_exceptions: bool) -> bool:
        value = result.get(propagate=False)
        values.append(value)
        return isinstance(value, DispatchError) and not return_exceptions

    def _get_executor(self) -> Executor:
        executor = self._executor
        if executor is not None:
            return executor
        with self._lock:
            if self._closing:
                raise UsageError("this Dispatcher is closed")
            if self._executor is None:
                name = self.settings.executor
                executor = self._pipeline.pm.hook.dispatchkit_executor(dispatcher=self)
                if executor is None:
                    raise UsageError(
                        f"no plugin provides the executor {name!r} (is its plugin installed?)"
                    )
                self._executor = executor
            return self._executor

    @property
    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin: name, distribution, version and the hooks it implements."""
        return self._pipeline.plugins

    @property
    def endpoints(self) -> Endpoints:
        """The endpoint guard's state per origin: ``list()``, ``enable(url)``, ``reset(origin)``."""
        return self._pipeline.endpoints

    def close(self) -> None:
        """Release every resource (executor, transports, plugins'); safe to call twice.

        Calls already submitted finish first: none is dropped.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True  # no new submit() from here on
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self._closed = True
        with self._lock:
            transports = {id(t): t for t in self._transports.values()}.values()
            self._transports.clear()
        for transport in transports:  # one transport may serve several schemes
            transport.close()
        self._pipeline.close_plugins()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(info.name for info in self._pipeline.infos)
        return f"<Dispatcher plugins=[{names}]{' closed' if self._closed else ''}>"

    # -- sending ----------------------------------------------------------------------

    def _run(self, request: Request) -> Any:
        if self._closed:
            raise UsageError("this Dispatcher is closed", request=request)
        pipeline = self._pipeline
        attempt = self._attempt if pipeline.guard is None else self._guarded_attempt
        started = time.perf_counter()
        try:
            transport = self._transport_for(request)
            try:
                response = attempt(request, transport)
            except DispatchError as first:
                if pipeline.retrying is None:
                    raise
                response = pipeline.retrying(
                    AfterFailure(first, lambda: attempt(request, transport))
                )
            retval = pipeline.retval(request, response)
        except DispatchError as exc:
            pipeline.failed(request, exc, started)
            raise
        pipeline.succeeded(request, retval, started)
        return retval

    def _attempt(self, request: Request, transport: Transport) -> Response:
        pipeline = self._pipeline
        pipeline.begin_attempt(request)
        try:
            response = transport.send(request)
        except DispatchError as exc:
            pipeline.attempt_failed(request, exc)
            raise
        except Exception as exc:
            error = plugin_failure(exc, request)
            pipeline.attempt_failed(request, error)
            raise error from exc
        return pipeline.checked(request, response)

    def _guarded_attempt(self, request: Request, transport: Transport) -> Response:
        """:meth:`_attempt` once the endpoint guard admits it (waiting in this thread)."""
        pipeline = self._pipeline
        while wait := pipeline.admit(request):
            time.sleep(wait)
        error: BaseException | None = None
        try:
            return self._attempt(request, transport)
        except BaseException as exc:
            error = exc
            raise
        finally:
            pipeline.report(request, error)

    def _transport_for(self, request: Request) -> Transport:
        transport = self._transports.get(request.url.partition(":")[0])
        if transport is not None:
            return transport
        scheme = scheme_of(request)
        with self._lock:
            transport = self._transports.get(scheme)
            if transport is None:
                if self._closing:
                    raise UsageError("this Dispatcher is closed", request=request)
                transport = self._pipeline.pm.hook.dispatchkit_transport(
                    scheme=scheme, dispatcher=self
                )
                if transport is None:
                    raise UsageError(f"no transport for scheme {scheme!r}", request=request)
                self._transports[scheme] = transport
        return transport
