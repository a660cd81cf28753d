"""The HTTP gateway: clients in any language apply a TaskApp's tasks asynchronously.

This is Celery 1.0's ``celery.views.apply`` / ``task_status`` / ``is_task_done``
(its ``celery_http_gateway`` example): ``/apply/<name>`` hands the call to a
:class:`~dispatchkit.Dispatcher`'s executor, which calls the app's own task
endpoint; ``/<id>/status`` and ``/<id>/done`` read the result from a bounded
store, which keeps of a finished call only what its status shows.
:class:`~dispatchkit.server.TaskApp` does the HTTP side (routing, arguments,
errors); this module holds the gateway's state and its answers.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import re
import threading
import traceback
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, urlsplit

import orjson

from dispatchkit._checks import count, seconds
from dispatchkit._dispatcher import Dispatcher
from dispatchkit._models import Result
from dispatchkit._results import AsyncResult
from dispatchkit.exceptions import DispatchError, EncodeError, RemoteExecuteError
from dispatchkit.server._arguments import FormValues
from dispatchkit.server._refused import Refused
from dispatchkit.server._store import ResultStore, StoreFull
from dispatchkit.states import FAILURE, PENDING, SUCCESS

if TYPE_CHECKING:
    from dispatchkit.server._http import Origin

__all__ = ["APPLY_PREFIX", "RESULTS_MAX_BYTES", "Gateway", "Route", "route"]

logger = logging.getLogger("dispatchkit.server")

APPLY_PREFIX = "/apply/"
# An Idempotency-Key becomes a path segment (/<id>/status): URL-safe, not "." or "..",
# and never "apply", whose /apply/status would read as applying a task named "status".
_KEY = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,199}")
_RESERVED_IDS = frozenset({"apply"})
# A server bound to every interface is reached on loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}
_HOST = re.compile(r"[A-Za-z0-9._~%:-]+|\[[0-9A-Fa-f:.%]+\]")
# A finished result answers get() at once; this only bounds an executor that does not.
_READ_TIMEOUT = 5.0
#: The result store's default bound in bytes.
RESULTS_MAX_BYTES = 64 << 20
# What an entry of the store costs beyond the bytes counted for it (its objects), about.
_ENTRY_BYTES = 512


class Route(NamedTuple):
    """A gateway path: ``action`` is ``"apply"`` (``arg`` the task name), ``"status"`` or
    ``"done"`` (``arg`` the task id)."""

    action: str
    arg: str


def route(path: str) -> Route | None:
    """The gateway route of a request's path, or ``None`` for any other path.

    ``/apply/<name>`` always applies (so a task named ``apply`` stays at ``/apply``);
    ``/<id>/status`` and ``/<id>/done`` never clash with a task, whose name has no ``/``.
    """
    if path.startswith(APPLY_PREFIX):
        return Route("apply", path[len(APPLY_PREFIX) :])
    head, slash, tail = path[1:].partition("/")
    if path.startswith("/") and slash and head and tail in ("status", "done"):
        return Route(tail, head)
    return None


def forwarded(received: Mapping[str, object]) -> dict[str, object]:
    """The arguments as received, as plain data: a form value is a str, a repeated key a list.

    The task endpoint converts them, exactly as if the client had called it;
    plain data also lets an executor ship the call to another process.
    """
    return {
        key: (value[0] if len(value) == 1 else list(value))
        if isinstance(value, FormValues)
        else value
        for key, value in received.items()
    }


def task_id_from(idempotency_key: str | None) -> str:
    """The task id of an apply: the client's ``Idempotency-Key``, else a new uuid4 hex."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    key = idempotency_key.strip()
    if not _KEY.fullmatch(key) or key in _RESERVED_IDS:
        raise Refused(
            HTTPStatus.BAD_REQUEST,
            f"invalid Idempotency-Key {key[:60]!r}: use 1-200 characters of "
            "A-Z a-z 0-9 . _ ~ - (not starting with '.', not 'apply')",
        )
    return key


class _Reserved:
    """Holds a task id's place in the store while its call is being submitted."""

    __slots__ = ("id",)

    def __init__(self, task_id: str) -> None:
        self.id = task_id

    @property
    def state(self) -> str:
        return PENDING

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        return None

    def ready(self) -> bool:
        return False

    def successful(self) -> bool:
        return False

    def failed(self) -> bool:
        return False


class _Finished:
    """All the store keeps of a finished call: what its status shows, the result as JSON.

    The call's result handle goes, and with it the request it carried (the
    arguments, the error's request, the traceback's frames).
    """

    __slots__ = ("exc", "result", "state", "traceback", "unencodable")

    def __init__(
        self,
        state: str,
        result: bytes,
        exc: str | None = None,
        traceback: str | None = None,
        unencodable: str | None = None,
    ) -> None:
        self.state = state
        self.result = result
        self.exc = exc
        self.traceback = traceback
        self.unencodable = unencodable

    @property
    def size(self) -> int:
        return len(self.result) + len(self.exc or "") + len(self.traceback or "")


class Gateway:
    """The gateway's state: where calls run, where they call back, and their results.

    ``dispatcher`` runs the calls (it is not closed here); without one, a
    Dispatcher with default settings is created on the first apply and closed
    by :meth:`close`. ``callback_url`` is the base URL of the app's own task
    endpoints; without one it is derived from the address each request reached
    (never from its Host header). ``results_max``, ``results_max_age`` and
    ``results_max_bytes`` bound the result store; an apply that does not fit
    in its bytes is refused (503 with ``Retry-After``).
    """

    def __init__(
        self,
        *,
        dispatcher: Dispatcher | None,
        callback_url: str | None,
        results_max: int,
        results_max_age: float,
        results_max_bytes: int = RESULTS_MAX_BYTES,
    ) -> None:
        if dispatcher is not None and not isinstance(dispatcher, Dispatcher):
            raise TypeError(f"dispatcher must be a Dispatcher, got {type(dispatcher).__name__}")
        self.callback_url = None if callback_url is None else _checked_url(callback_url)
        count(results_max, "results_max")
        seconds(results_max_age, "results_max_age")
        count(results_max_bytes, "results_max_bytes")
        self.store: ResultStore[Result | _Finished] = ResultStore(
            results_max, results_max_age, max_bytes=results_max_bytes
        )
        self._given = dispatcher
        self._own: Dispatcher | None = None
        self._closed = False
        self._lock = threading.Lock()

    # -- the three endpoints ------------------------------------------------------------

    def apply(
        self,
        name: str,
        method: str,
        kwargs: Mapping[str, object],
        *,
        json: bool,
        task_id: str,
        origin: Origin,
    ) -> dict[str, Any]:
        """Submit a call of the app's task ``name``; answer its id at once.

        An id already in the store is answered again without a second call,
        so a client that retries its apply with the same Idempotency-Key does
        not run the task twice. Until the call finishes its entry counts the
        size of its arguments, which the call holds; an apply that does not
        fit in ``results_max_bytes`` is refused with 503 and ``Retry-After``.
        """
        url = f"{self.callback_base(origin)}/{name}"
        answer = {"ok": "true", "task_id": task_id}
        size = _ENTRY_BYTES + len(task_id) + _arguments_size(kwargs)
        try:
            added = self.store.add(task_id, _Reserved(task_id), size)
        except StoreFull as full:
            if full.retry_after is None:
                raise Refused(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"the arguments ({size} bytes as stored) exceed results_max_bytes "
                    f"({self.store.max_bytes})",
                ) from None
            raise Refused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the gateway's result store is full (results_max_bytes); try again later",
                [("Retry-After", str(full.retry_after))],
            ) from None
        if not added:
            return answer
        submitted = False
        try:
            dispatcher = self._dispatcher()
            result = dispatcher.apply_async(url, method, kwargs, task_id=task_id, json=json)
            submitted = True
        except EncodeError as exc:
            raise Refused(HTTPStatus.BAD_REQUEST, exc.message) from None
        except DispatchError as exc:  # a closed Dispatcher, an executor that refuses work
            logger.error("gateway: cannot apply %r: %s", name, exc)
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, f"cannot apply: {exc.message}") from None
        finally:
            if not submitted:
                self.store.discard(task_id)  # nothing runs: a retry may apply it afresh
        self.store.replace(task_id, result)
        if isinstance(result, AsyncResult):
            # Settled as soon as it finishes, by a callback that holds the id, not the
            # result: once settled, nothing keeps the finished call (and its request) alive.
            result.future.add_done_callback(functools.partial(self._settle_finished, task_id))
        return answer

    def status(self, task_id: str) -> dict[str, Any]:
        """Celery 1.0's ``task_status``: state and result; an unknown id is ``PENDING``."""
        entry = self._lookup(task_id)
        if not isinstance(entry, _Finished):
            return {"task": {"id": task_id, "status": entry, "result": None}}
        if entry.unencodable is not None:
            raise Refused(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot encode the result: {entry.unencodable}"
            )
        answer: dict[str, Any] = {
            "id": task_id,
            "status": entry.state,
            "result": orjson.Fragment(entry.result),
        }
        if entry.state == FAILURE:
            answer["exc"] = entry.exc
            answer["traceback"] = entry.traceback
        return {"task": answer}

    def done(self, task_id: str) -> dict[str, Any]:
        """Celery 1.0's ``is_task_done``: whether the call has finished (false when unknown)."""
        return {"task": {"id": task_id, "executed": isinstance(self._lookup(task_id), _Finished)}}

    def _lookup(self, task_id: str) -> _Finished | str:
        """A finished call's entry, else the state of the call (``PENDING``: unknown).

        The call's state is read once: a call that finishes between two reads
        would otherwise show ``SUCCESS`` without its result.
        """
        entry = self.store.get(task_id)
        if entry is None:
            return PENDING
        if isinstance(entry, _Finished):
            return entry
        # an executor without done callbacks: settled on the first look after it finished
        return self._settle(task_id, entry, entry.state)

    def _settle_finished(self, task_id: str, future: concurrent.futures.Future[Any]) -> None:
        entry = self.store.get(task_id)
        if isinstance(entry, AsyncResult) and entry.future is future:
            try:
                self._settle(task_id, entry, entry.state)
            except Exception:  # the next look at the status settles it
                logger.exception("gateway: cannot keep the result of task %s", task_id)

    def _settle(self, task_id: str, result: Result, state: str) -> _Finished | str:
        """Replace a call's handle in the store by what its status shows, if ``state``
        (read once, by the caller) is an end; else ``state``."""
        if state == SUCCESS:
            value = _value(result)
            try:
                finished = _Finished(SUCCESS, _json(value))
            except TypeError as exc:
                logger.error("gateway: cannot encode the result of task %s: %s", task_id, exc)
                finished = _Finished(SUCCESS, b"null", unencodable=str(exc))
        elif state == FAILURE:
            error = _value(result)
            reason = error.reason if isinstance(error, RemoteExecuteError) else str(error)
            finished = _Finished(
                FAILURE, _json(reason), _class_name(error), _traceback(result, error)
            )
            if isinstance(error, BaseException) and error.__traceback__ is not None:
                # the frames' locals (the request among them) often refer back to the
                # error: without them the error goes with its handle, not at the next gc
                traceback.clear_frames(error.__traceback__)
        else:
            return state
        self.store.settle(task_id, result, finished, _ENTRY_BYTES + len(task_id) + finished.size)
        return finished

    # -- resources ----------------------------------------------------------------------

    def callback_base(self, origin: Origin) -> str:
        """The base URL the calls go to: ``callback_url``, else the server this request reached.

        Built from the request's :class:`~dispatchkit.server._http.Origin`: the
        scheme, the address the server is bound to and the path the app is
        mounted at (WSGI: ``wsgi.url_scheme``, ``SERVER_NAME``, ``SERVER_PORT``,
        ``SCRIPT_NAME``; ASGI: ``scheme``, ``server``, ``root_path``), never
        from the Host header, which the client controls.
        """
        if self.callback_url is not None:
            return self.callback_url
        scheme, host, port, script = origin
        host = _WILDCARDS.get(host, host)
        if scheme not in ("http", "https") or not _HOST.fullmatch(host) or not port.isdigit():
            raise Refused(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "cannot derive the callback URL from the server's address; pass callback_url=",
            )
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}{quote(script.rstrip(b'/'), safe='/')}"

    def _dispatcher(self) -> Dispatcher:
        with self._lock:
            if self._closed:
                raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "the gateway is closed")
            if self._given is not None:
                return self._given
            if self._own is None:
                self._own = Dispatcher()
            return self._own

    def close(self) -> None:
        """Refuse new applies; close the Dispatcher made here (its calls finish first)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            own, self._own = self._own, None
        if own is not None:
            own.close()


def _checked_url(url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"callback_url must be a str, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            f"callback_url must be an http(s) URL without query or fragment, got {url!r}"
        )
    return url.rstrip("/")


def _arguments_size(kwargs: Mapping[str, object]) -> int:
    """The bytes of the arguments, as the call will send them (about)."""
    try:
        return len(orjson.dumps(dict(kwargs)))
    except TypeError:  # not plain JSON data, or nested past orjson's limit: an estimate
        return _estimate(kwargs)


def _estimate(value: object) -> int:
    """About the bytes of ``value`` as JSON, without recursion (it may be 1,000 deep)."""
    size, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            size += len(item) + 3
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
            size += 2
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
            size += 2
        else:
            size += 8
    return size


def _json(value: Any) -> bytes:
    # orjson's output may sit in a larger allocation (4 kB for a short one): keep a copy
    return bytes(memoryview(orjson.dumps(value)))


def _value(result: Result) -> Any:
    try:
        return result.get(timeout=_READ_TIMEOUT, propagate=False)
    except DispatchError as exc:  # cancelled, or an executor slower than its own state
        return exc


def _class_name(error: object) -> str:
    cls = type(error)
    return f"{cls.__module__}.{cls.__qualname__}"


def _traceback(result: Result, error: object) -> str | None:
    text = getattr(result, "traceback", None)
    if isinstance(text, str):
        return text
    if isinstance(error, BaseException):
        return "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return None
