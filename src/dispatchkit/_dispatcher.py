"""The Dispatcher: one call, top to bottom, over strategies resolved once."""

from __future__ import annotations

import logging
import reprlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import tenacity

from dispatchkit._answers import Answers
from dispatchkit._encoding import build_request, new_task_id
from dispatchkit._models import (
    Call,
    Codec,
    Executor,
    Outcome,
    PluginInfo,
    Request,
    Response,
    Result,
    Transport,
)
from dispatchkit._plugins import build_manager
from dispatchkit._settings import Settings
from dispatchkit.exceptions import DispatchError, UsageError

log = logging.getLogger("dispatchkit")

_EMPTY: Mapping[str, Any] = {}
#: The name in the log lines, after the seed's ``Task ...HttpDispatchTask[<id>] processed: 100``.
TASK_NAME = "dispatchkit.HttpDispatchTask"
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200
_short = _repr.repr


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
        self.settings = Settings.from_kwargs(settings)
        self._pm, self._infos = build_manager(plugins, disable)
        hook = self._pm.hook
        self._closing = self._closed = False
        self._lock = threading.Lock()
        self._transports: dict[str, Transport] = {}
        self._answers = Answers(self._resolve_codec, self.settings.follow_redirects)
        self._executor: Executor | None = None
        self._headers = {"User-Agent": self.settings.user_agent}
        if not self.settings.keep_alive:
            self._headers["Connection"] = "close"
        hook.dispatchkit_configure(settings=self.settings)
        unknown = self.settings.unread_extras()
        if unknown:
            self.close()
            raise UsageError(
                f"unknown setting(s) {', '.join(map(repr, unknown))}: no plugin reads them"
            )
        retrying = hook.dispatchkit_retry_policy(settings=self.settings)
        if retrying is not None and not isinstance(retrying, tenacity.Retrying):
            self.close()
            raise UsageError(
                f"dispatchkit_retry_policy returned {retrying!r}, not a tenacity.Retrying"
            )
        self._retrying: tenacity.Retrying | None = retrying
        # Only the per-call hooks someone implements are called: pluggy stays off the hot path.
        self._prepare = (
            hook.dispatchkit_prepare_request
            if self._implemented("dispatchkit_prepare_request")
            else None
        )
        self._done = (
            hook.dispatchkit_call_done if self._implemented("dispatchkit_call_done") else None
        )

    def _implemented(self, name: str) -> bool:
        return bool(getattr(self._pm.hook, name).get_hookimpls())

    # -- public API ---------------------------------------------------------------

    def call(self, url: str, /, method: str = "GET", **kwargs: Any) -> Any:
        """Call the task at ``url`` with ``kwargs`` and return its ``retval``.

        Raises :class:`~dispatchkit.RemoteExecuteError` when the task reports
        failure, and another :class:`~dispatchkit.DispatchError` when the
        call itself fails. For per-call options use :meth:`apply`.
        """
        return self._run(self._build(Call(url, method, kwargs)))

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
        """Like :meth:`call`, with the task's arguments as a mapping and options beside them.

        Because the arguments are one mapping, an option can never collide
        with a task argument. ``timeout`` overrides the setting for this call,
        ``headers`` are added to the request, ``task_id`` is sent as the
        ``Idempotency-Key`` (a uuid4 hex by default), ``json=True`` sends the
        arguments as one JSON object (POST, PUT, PATCH) instead of a form.
        """
        call = Call(url, method, kwargs or _EMPTY, task_id or "", timeout, headers, json)
        return self._run(self._build(call))

    def execute(self, call: Call) -> Any:
        """Run a :class:`~dispatchkit.Call` here and now; what executors call."""
        return self._run(self._build(call))

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
    ) -> Result:
        """Like :meth:`apply`, on the executor: returns at once with the call's result handle."""
        call = Call(url, method, kwargs or _EMPTY, task_id or new_task_id(), timeout, headers, json)
        # Built here only to be checked (method, URL, arguments, headers) in the caller,
        # before anything is queued; the executor builds it again where it runs.
        request = self._build(call)
        if call.method != request.method:
            call = Call(call.url, request.method, call.kwargs, call.task_id, timeout, headers, json)
        return self._get_executor().submit(call)

    def map(
        self,
        url: str,
        calls: Iterable[Mapping[str, Any]],
        method: str = "GET",
        *,
        concurrency: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Call ``url`` once per mapping of arguments in ``calls``; return the retvals in order.

        At most ``concurrency`` calls (default ``pool_maxsize``) are in flight at
        once, so a long iterable never queues everything up front. The first
        error (in order) is raised once the calls in flight have finished, and
        no new call starts after it; with ``return_exceptions=True`` errors take
        their place in the list instead.
        """
        window = concurrency or self.settings.pool_maxsize
        if window < 1:
            raise UsageError(f"concurrency must be positive, got {concurrency!r}")
        pending: deque[Result] = deque()
        values: list[Any] = []
        failed = False
        for kwargs in calls:
            if len(pending) >= window:
                failed = self._collect(pending.popleft(), values, return_exceptions) or failed
                if failed:
                    break
            pending.append(self.apply_async(url, method, kwargs))
        while pending:
            failed = self._collect(pending.popleft(), values, return_exceptions) or failed
        if failed:
            raise next(v for v in values if isinstance(v, DispatchError))
        return values

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
                executor = self._pm.hook.dispatchkit_executor(dispatcher=self)
                if executor is None:
                    raise UsageError(
                        f"no plugin provides the executor {name!r} (is its plugin installed?)"
                    )
                self._executor = executor
            return self._executor

    @property
    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin: name, distribution, version and the hooks it implements."""
        return list(self._infos)

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
        self._pm.hook.dispatchkit_close(dispatcher=self)

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
        names = ", ".join(info.name for info in self._infos)
        return f"<Dispatcher plugins=[{names}]{' closed' if self._closed else ''}>"

    # -- the pipeline ---------------------------------------------------------------

    def _build(self, call: Call) -> Request:
        try:
            return build_request(call, self._headers, self.settings.timeout)
        except DispatchError as exc:
            # Nothing was sent, but the error still says which call it was.
            url, task_id = call.url, call.task_id or new_task_id()
            shown = url if isinstance(url, str) else repr(url)
            if not (isinstance(task_id, str) and task_id.isprintable()):
                task_id = repr(task_id)  # a refused one: never a line break into a log
            raise exc.with_context(task_id, str(call.method).upper(), shown) from exc.__cause__

    def _run(self, request: Request) -> Any:
        if self._closed:
            raise UsageError("this Dispatcher is closed", request=request)
        started = time.perf_counter()
        try:
            transport = self._transport_for(request)
            try:
                response = self._attempt(request, transport)
            except DispatchError as first:
                # The first attempt runs outside tenacity, which costs more than the
                # rest of the pipeline; from its failure on, the policy decides.
                if self._retrying is None:
                    raise
                response = self._retrying(_AfterFailure(first, self._attempt, request, transport))
            retval = self._answers.retval(request, response)
        except DispatchError as exc:
            exc.bind(request)
            if log.isEnabledFor(logging.INFO):
                log.info("Task %s[%s] raised %s: %s", TASK_NAME, request.task_id,
                         type(exc).__name__, exc.message)  # fmt: skip
            if self._done is not None:
                self._report(
                    request, Outcome(None, exc, time.perf_counter() - started, request.attempt)
                )
            raise
        if log.isEnabledFor(logging.INFO):
            log.info("Task %s[%s] processed: %s", TASK_NAME, request.task_id, _short(retval))
        if self._done is not None:
            self._report(
                request, Outcome(retval, None, time.perf_counter() - started, request.attempt)
            )
        return retval

    def _attempt(self, request: Request, transport: Transport) -> Response:
        request.attempt += 1
        try:
            if self._prepare is not None:
                self._prepare(request=request)
            response: Response = transport.send(request)
        except DispatchError as exc:
            exc.bind(request)  # the retry policy decides on the call's method
            raise
        except Exception as exc:
            # A plugin broke its contract; the caller still gets one error type, with context.
            raise DispatchError(
                f"plugin failure: {type(exc).__name__}: {exc}", request=request
            ) from exc
        if 200 <= response.status < 300:
            return response
        raise self._answers.status_error(request, response)

    # -- strategies, resolved once ------------------------------------------------

    def _transport_for(self, request: Request) -> Transport:
        scheme = request.url.partition(":")[0].lower() if "://" in request.url else ""
        transport = self._transports.get(scheme)
        if transport is not None:
            return transport
        if not scheme:
            raise UsageError(f"URL has no scheme: {request.url!r}", request=request)
        with self._lock:
            transport = self._transports.get(scheme)
            if transport is None:
                if self._closing:
                    raise UsageError("this Dispatcher is closed", request=request)
                transport = self._pm.hook.dispatchkit_transport(scheme=scheme, dispatcher=self)
                if transport is None:
                    raise UsageError(f"no transport for scheme {scheme!r}", request=request)
                self._transports[scheme] = transport
        return transport

    def _resolve_codec(self, media_type: str) -> Codec | None:
        codec: Codec | None = self._pm.hook.dispatchkit_codec(
            media_type=media_type, dispatcher=self
        )
        return codec

    def _report(self, request: Request, outcome: Outcome) -> None:
        assert self._done is not None
        try:
            self._done(request=request, outcome=outcome)
        except Exception:
            log.exception("a dispatchkit_call_done hook failed for task %s", request.task_id)


class _AfterFailure:
    """The attempts of one call, for tenacity to drive after the first one failed.

    tenacity's first "attempt" re-raises the failure that already happened, so
    the policy decides on it as if it had run it; every later one is real.
    """

    def __init__(
        self,
        failure: DispatchError,
        attempt: Callable[[Request, Transport], Response],
        request: Request,
        transport: Transport,
    ) -> None:
        self._failure: DispatchError | None = failure
        self._attempt = attempt
        self._request = request
        self._transport = transport

    def __call__(self) -> Response:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        return self._attempt(self._request, self._transport)
