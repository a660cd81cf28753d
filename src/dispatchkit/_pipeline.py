"""One call's pipeline, without I/O: what both dispatchers share.

Building the request, the per-call hooks, turning an answer into a retval or
an error, the record of each attempt, the retry policy, the endpoint guard's
admissions and reports, logging: all of it is here, once.
:class:`~dispatchkit.Dispatcher` (threads) and :class:`~dispatchkit.AsyncDispatcher`
(asyncio) drive a :class:`Pipeline`; only sending a request and sleeping (between
attempts, and while the guard says wait) differ between them.
"""

from __future__ import annotations

import logging
import os
import reprlib
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar
from urllib.parse import quote_plus

import orjson
import tenacity

from dispatchkit._encoding import (
    FORM,
    QUERY_METHODS,
    build_request,
    check_headers,
    check_options,
    new_task_id,
    normalize_method,
)
from dispatchkit._endpoints import (
    EndpointGuard,
    Endpoints,
    Ticket,
    endpoint_key,
    refusal,
    verdict_of,
)
from dispatchkit._models import (
    ATTEMPT_BODY_BYTES,
    NO_OPTIONS,
    STATUS_SUCCESS,
    Attempt,
    Call,
    Codec,
    Outcome,
    PluginInfo,
    Request,
    Response,
)
from dispatchkit._plugins import build_manager
from dispatchkit._responses import ResponseReader
from dispatchkit._settings import Settings
from dispatchkit.builtin.codec import JSONCodec
from dispatchkit.exceptions import DispatchError, DispatchTimeout, UsageError

log = logging.getLogger("dispatchkit")

#: The name in the log lines, after Celery's ``Task ...HttpDispatchTask[<id>] processed: 100``.
TASK_NAME = "dispatchkit.HttpDispatchTask"
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200
_short = _repr.repr
#: The shortest wait between two admissions of one attempt (a guard's "wait 0" is no spin).
MIN_WAIT = 0.001

T = TypeVar("T")


class Pipeline:
    """Settings, plugins and every decision of a call; the dispatcher that owns it sends.

    ``owner`` is the Dispatcher or AsyncDispatcher passed to the hooks that
    take one. Building it runs ``dispatchkit_configure`` and asks for the
    retry policy; an unknown setting or a bad policy is a :class:`UsageError`.
    """

    def __init__(
        self,
        owner: object,
        settings: dict[str, Any],
        plugins: Iterable[object],
        disable: Iterable[str],
    ) -> None:
        self.settings = Settings.from_kwargs(settings)
        self.pm, self.infos = build_manager(plugins, disable, settings)
        self._owner = owner
        hook = self.pm.hook
        self.headers = {"User-Agent": self.settings.user_agent}
        if not self.settings.keep_alive:
            self.headers["Connection"] = "close"
        self.reader = ResponseReader(self._resolve_codec, self.settings.follow_redirects)
        hook.dispatchkit_configure(settings=self.settings)
        unknown = self.settings.unread_extras()
        if unknown:
            self.close_plugins()
            raise UsageError(
                f"unknown setting(s) {', '.join(map(repr, unknown))}: no plugin reads them"
            )
        retrying = hook.dispatchkit_retry_policy(settings=self.settings)
        if retrying is not None and not isinstance(retrying, tenacity.Retrying):
            self.close_plugins()
            raise UsageError(
                f"dispatchkit_retry_policy returned {retrying!r}, not a tenacity.Retrying"
            )
        self.retrying: tenacity.Retrying | None = retrying
        guard = hook.dispatchkit_endpoint_guard(settings=self.settings)
        if guard is not None and not isinstance(guard, EndpointGuard):
            self.close_plugins()
            raise UsageError(f"dispatchkit_endpoint_guard returned {guard!r}, not an EndpointGuard")
        #: ``None`` unless a plugin guards endpoints: then the drivers admit each attempt.
        self.guard: EndpointGuard | None = guard
        self.endpoints = Endpoints(guard)
        # Only the per-call hooks someone implements are called: pluggy stays off the hot path.
        self._prepare = (
            hook.dispatchkit_prepare_request
            if self.implemented("dispatchkit_prepare_request")
            else None
        )
        self._done = (
            hook.dispatchkit_call_done if self.implemented("dispatchkit_call_done") else None
        )
        self._attempt_done = (
            hook.dispatchkit_attempt_done if self.implemented("dispatchkit_attempt_done") else None
        )

    def implemented(self, name: str) -> bool:
        return bool(getattr(self.pm.hook, name).get_hookimpls())

    def close_plugins(self) -> None:
        self.pm.hook.dispatchkit_close(dispatcher=self._owner)

    @property
    def plugins(self) -> list[PluginInfo]:
        return list(self.infos)

    # -- one call ---------------------------------------------------------------------

    def build(self, call: Call) -> Request:
        """The request for ``call``; a refusal names the call (nothing was sent)."""
        if not isinstance(call, Call):
            raise UsageError(f"execute takes a dispatchkit.Call, got {type(call).__name__}")
        try:
            return build_request(call, self.headers, self.settings.timeout)
        except DispatchError as exc:
            url, task_id = call.url, call.task_id or new_task_id()
            shown = url if isinstance(url, str) else repr(url)
            if not (isinstance(task_id, str) and task_id.isprintable()):
                task_id = repr(task_id)  # a refused one: never a line break into a log
            raise exc.with_context(task_id, str(call.method).upper(), shown) from exc.__cause__

    def builder(
        self, url: str, method: str, options: Mapping[str, str] | None = None
    ) -> Callable[[Mapping[str, Any]], Request]:
        """``build`` for many calls of one URL and method: ``builder(...)(kwargs)``.

        Gives the request ``build(Call(url, method, kwargs, options=options))``
        would, checking and preparing the parts the calls share once (the method,
        the options, the headers but the task id); a URL, method or options
        ``build`` refuses, and arguments its fast encoding does not take, go
        through ``build`` itself, so every error is the one ``build`` raises.
        """
        try:
            if not isinstance(url, str):
                raise UsageError("not a str")
            verb = normalize_method(method)
            shared = NO_OPTIONS if options is None else check_options(options)
        except DispatchError:
            return lambda kwargs: self.build(Call(url, method, kwargs, options=options))
        headers = dict(self.headers)
        timeout = self.settings.timeout
        in_query = verb in QUERY_METHODS
        if not in_query:
            headers["Content-Type"] = FORM
        plain = not in_query or ("?" not in url and "#" not in url)
        names: dict[object, str] = {}  # an argument's name -> its quoted name and "="
        task_ids = TaskIds()

        def make(kwargs: Mapping[str, Any]) -> Request:
            fields = _fields(kwargs, names) if plain else None
            if fields is None:  # anything but flat str, int, float, bool and None arguments
                return self.build(Call(url, method, kwargs, options=options))
            if in_query:
                target, body = (f"{url}?{fields}" if fields else url), None
            else:
                target, body = url, fields.encode("ascii")
            sent = headers.copy()
            sent["Idempotency-Key"] = task_id = task_ids()
            return Request(verb, target, kwargs, sent, body, task_id, timeout, options=shared)

        return make

    def begin_attempt(self, request: Request) -> None:
        """Count the attempt, start its clock if it is recorded, run ``prepare_request`` hooks.

        Every attempt begun ends in exactly one of :meth:`attempt_failed` (nothing
        came back), :meth:`checked` raising (a non-2xx answer) or :meth:`retval`
        (a 2xx answer, read once the retry policy is done): each records it.
        """
        request.attempt += 1
        if self._attempt_done is not None or request.attempts is not None:
            request._began = (time.time(), time.perf_counter())
        if self._prepare is not None:
            try:
                self._prepare(request=request)
                # A plugin's header must be sendable too: refused here, before anything is
                # sent, the same way by both transports (http.client lets NUL through).
                check_headers(request.headers)
            except DispatchError as exc:
                self.attempt_failed(request, exc)
                raise
            except Exception as exc:
                error = plugin_failure(exc, request)
                self.attempt_failed(request, error)
                raise error from exc

    def attempt_failed(self, request: Request, error: DispatchError) -> None:
        """The attempt got no answer: bind the call to ``error`` and record the attempt."""
        error.bind(request)  # the retry policy decides on the call's method
        if request._began is not None:
            self._record(request, None, error)

    def checked(self, request: Request, response: Response) -> Response:
        """``response`` if it is a 2xx; else the error its status (or envelope) means."""
        if 200 <= response.status < 300:
            return response  # recorded by retval(), once its envelope is read
        error = self.reader.status_error(request, response)
        if request._began is not None:
            self._record(request, response, error)
        raise error

    def retval(self, request: Request, response: Response) -> Any:
        """The retval of the 2xx answer to the last attempt, or the error its envelope means."""
        if request._began is None:
            if type(self.reader.codec(request, response)) is JSONCodec and response.body:
                # The built-in codec's success envelope, read without making the Envelope
                # (what its decode and the reader do); anything else goes the whole way.
                try:
                    envelope = orjson.loads(response.body)
                except orjson.JSONDecodeError:
                    envelope = None
                if type(envelope) is dict and envelope.get("status") == STATUS_SUCCESS:
                    return envelope.get("retval")
            return self.reader.retval(request, response)
        try:
            retval = self.reader.retval(request, response)
        except DispatchError as exc:
            self._record(request, response, exc)
            raise
        self._record(request, response, None)
        return retval

    # -- the endpoint guard (only when self.guard is not None) --------------------------

    def admit(self, request: Request) -> float:
        """Ask the guard for the next attempt of ``request``: ``0.0`` once it may start.

        Otherwise the seconds to wait before asking again. An admitted attempt
        holds its slot until :meth:`report`. A refusal is raised, recorded as a
        failed attempt (nothing was sent): :class:`~dispatchkit.CircuitOpenError`,
        :class:`~dispatchkit.EndpointDisabledError`, or a
        :class:`~dispatchkit.DispatchTimeout` when the wait would end past the
        call's timeout.
        """
        guard = self.guard
        assert guard is not None
        try:
            ticket = request._ticket
            if ticket is None:
                ticket = request._ticket = Ticket(*endpoint_key(request.url))
            admission = guard.admit(ticket.origin, ticket.endpoint, time.time())
        except DispatchError as exc:
            raise self._refused(request, exc) from exc.__cause__
        except Exception as exc:
            raise self._refused(request, plugin_failure(exc, request)) from exc
        if admission.verdict == "go":
            ticket.held, ticket.probe, ticket.since = True, admission.probe, None
            return 0.0
        if admission.verdict != "wait":
            raise self._refused(request, refusal(admission, ticket.origin, ticket.endpoint))
        now = time.monotonic()
        if ticket.since is None:
            ticket.since = now
        if admission.wait <= ticket.since + request.timeout - now:
            return max(admission.wait, MIN_WAIT)
        waited, ticket.since = now - ticket.since, None
        raise self._refused(
            request,
            DispatchTimeout(
                f"no slot at {ticket.origin} within the call's timeout ({request.timeout:g} s, "
                f"waited {waited:.2g} s): {admission.reason or 'the guard said wait'}; "
                "nothing was sent"
            ),
        )

    def report(self, request: Request, error: BaseException | None) -> None:
        """Tell the guard how an admitted attempt ended (``None``: a 2xx answer); frees its slot.

        Whatever the error (a plugin's, a cancellation): the slot is never kept.
        """
        ticket = request._ticket
        if ticket is None or not ticket.held:
            return
        ticket.held = False
        assert self.guard is not None
        try:
            self.guard.report(
                ticket.origin, ticket.endpoint, verdict_of(error), time.time(), probe=ticket.probe
            )
        except Exception:
            log.exception("the endpoint guard failed to take a report for task %s", request.task_id)

    def _refused(self, request: Request, error: DispatchError) -> DispatchError:
        """The guard refused an attempt: it counts as one, failed before anything was sent."""
        request.attempt += 1
        if self._attempt_done is not None or request.attempts is not None:
            request._began = (time.time(), time.perf_counter())
        self.attempt_failed(request, error)
        return error

    # -- the end of a call -------------------------------------------------------------

    def succeeded(self, request: Request, retval: Any, started: float) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("Task %s[%s] processed: %s", TASK_NAME, request.task_id, _short(retval))
        if self._done is not None:
            self._report(
                request, Outcome(retval, None, time.perf_counter() - started, request.attempt)
            )

    def failed(self, request: Request, error: DispatchError, started: float) -> None:
        error.bind(request)
        if log.isEnabledFor(logging.INFO):
            log.info("Task %s[%s] raised %s: %s", TASK_NAME, request.task_id,
                     type(error).__name__, error.message)  # fmt: skip
        if self._done is not None:
            self._report(
                request, Outcome(None, error, time.perf_counter() - started, request.attempt)
            )

    def _record(
        self, request: Request, response: Response | None, error: DispatchError | None
    ) -> None:
        """Record the attempt that just ended: into the request's list, then to the hooks."""
        assert request._began is not None
        (started, clock), request._began = request._began, None
        if response is not None:
            outcome, status = str(response.status), response.status
            body = response.body[:ATTEMPT_BODY_BYTES].decode("utf-8", "replace")
        else:
            outcome, status, body = type(error).__name__, None, None
        attempt = Attempt(
            number=request.attempt,
            started=round(started, 6),  # what to_dict() keeps: records survive a round trip
            duration=time.perf_counter() - clock,
            outcome=outcome,
            status=status,
            error=None if error is None else str(error.bind(request)),
            body=body,
            worker=worker(),
            pool_wait=request._pool_wait,
        )
        request._pool_wait = 0.0
        if request.attempts is not None:
            request.attempts.append(attempt)
        if self._attempt_done is not None:
            try:
                self._attempt_done(request=request, attempt=attempt)
            except Exception:
                log.exception("a dispatchkit_attempt_done hook failed for task %s", request.task_id)

    def _report(self, request: Request, outcome: Outcome) -> None:
        assert self._done is not None
        try:
            self._done(request=request, outcome=outcome)
        except Exception:
            log.exception("a dispatchkit_call_done hook failed for task %s", request.task_id)

    def _resolve_codec(self, media_type: str) -> Codec | None:
        codec: Codec | None = self.pm.hook.dispatchkit_codec(
            media_type=media_type, dispatcher=self._owner
        )
        return codec


_worker = (0, "")


def worker() -> str:
    """``host:pid`` of this process, for :attr:`Attempt.worker`; made again in a forked child."""
    global _worker
    pid, name = _worker
    if pid != os.getpid():
        pid = os.getpid()
        name = f"{socket.gethostname()}:{pid}"
        _worker = (pid, name)
    return name


# Forks of this process so far, as the child sees it: a TaskIds never hands a child the ids
# it read before the fork (the parent hands out the same ones).
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class TaskIds:
    """Task ids as ``new_task_id`` makes them (uuid4 in hex, from ``os.urandom``), without
    a system call for each: one read of 64 ids' worth of random bytes.

    For one event loop (or thread): two must not share one.
    """

    __slots__ = ("_at", "_forks", "_hex")
    COUNT = 64

    def __init__(self) -> None:
        self._hex, self._at, self._forks = "", 0, -1

    def __call__(self) -> str:
        at = self._at
        if at == len(self._hex) or self._forks != _forks:
            raw = bytearray(os.urandom(16 * self.COUNT))
            raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
            raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # the RFC 4122 variant
            self._hex, at, self._forks = raw.hex(), 0, _forks
        self._at = at + 32
        return self._hex[at : at + 32]


#: How many argument names a :meth:`Pipeline.builder` keeps quoted.
_NAMES_MAX = 64


def _fields(kwargs: Mapping[str, Any], names: dict[object, str]) -> str | None:
    """The form encoding of ``kwargs`` as ``build`` makes it, for the common arguments.

    Flat ``str``, ``int``, ``float``, ``bool`` and ``None`` values under ``str``
    names (exactly those types, no subclasses); ``None`` for anything else, and
    for whatever would make ``build`` raise, which then encodes (or refuses)
    the arguments itself. ``names`` keeps each name's quoted form and ``=``.
    """
    parts: list[str] = []
    try:
        for name, value in kwargs.items():
            if type(name) is not str:
                return None
            kind = type(value)
            if kind is str:
                text = value if value.isascii() and value.isalnum() else quote_plus(value)
            elif kind is int:
                text = str(value)  # digits and "-": nothing to quote
            elif kind is bool:
                text = "true" if value else "false"
            elif value is None:
                continue  # left out, as build leaves it out
            elif kind is float:
                text = quote_plus(str(value))
            else:
                return None
            key = names.get(name)
            if key is None:
                key = (name if name.isascii() and name.isalnum() else quote_plus(name)) + "="
                if len(names) < _NAMES_MAX:
                    names[name] = key
            parts.append(key + text)
    except Exception:  # an int too long for str(), a lone surrogate, a broken mapping
        return None
    return "&".join(parts)


def plugin_failure(exc: Exception, request: Request) -> DispatchError:
    """A plugin broke its contract: the caller still gets one error type, with context."""
    return DispatchError(f"plugin failure: {type(exc).__name__}: {exc}", request=request)


def scheme_of(request: Request) -> str:
    """The URL's scheme, lower-case; a :class:`UsageError` when it has none."""
    url = request.url
    if "://" not in url:
        raise UsageError(f"URL has no scheme: {url!r}", request=request)
    return url.partition(":")[0].lower()


class AfterFailure(Generic[T]):
    """The attempts of one call, for tenacity to drive after the first one failed.

    The first attempt runs outside tenacity, which costs more than the rest of
    the pipeline. From its failure on the policy decides: tenacity's first
    "attempt" re-raises that failure, so the policy judges it as if it had run
    it; every later one is real. ``attempt()`` returns a Response (for the
    asyncio driver see :class:`AsyncAfterFailure`).
    """

    def __init__(self, failure: DispatchError, attempt: Callable[[], T]) -> None:
        self._failure: DispatchError | None = failure
        self._attempt = attempt

    def __call__(self) -> T:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        return self._attempt()


class AsyncAfterFailure(AfterFailure[Awaitable[T]]):
    """:class:`AfterFailure` for ``AsyncRetrying``, which awaits only coroutine callables."""

    async def __call__(self) -> T:
        return await super().__call__()
