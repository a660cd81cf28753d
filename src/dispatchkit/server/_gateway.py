"""The HTTP gateway: clients in any language apply a TaskApp's tasks asynchronously.

This is the seed's ``celery.views.apply`` / ``task_status`` / ``is_task_done``
(its ``celery_http_gateway`` example): ``/apply/<name>`` hands the call to a
:class:`~dispatchkit.Dispatcher`'s executor, which calls the app's own task
endpoint; ``/<id>/status`` and ``/<id>/done`` read the result from a bounded
store. :class:`~dispatchkit.server.TaskApp` does the HTTP side (routing,
arguments, errors); this module holds the gateway's state and its answers.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, urlsplit

from dispatchkit._dispatcher import Dispatcher
from dispatchkit._models import Result
from dispatchkit.exceptions import DispatchError, EncodeError, RemoteExecuteError
from dispatchkit.server._convert import FormValues
from dispatchkit.server._store import ResultStore
from dispatchkit.states import FAILURE, PENDING, SUCCESS

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

__all__ = ["APPLY_PREFIX", "Gateway", "GatewayError", "Route", "route"]

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


class GatewayError(Exception):
    """The gateway cannot do what was asked: answer ``status`` with ``reason``."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Route(NamedTuple):
    """A gateway path: ``action`` is ``"apply"`` (``arg`` the task name), ``"status"`` or
    ``"done"`` (``arg`` the task id)."""

    action: str
    arg: str


def route(path: str) -> Route | None:
    """The gateway route of a WSGI ``PATH_INFO``, or ``None`` for any other path.

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
        raise GatewayError(
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


class Gateway:
    """The gateway's state: where calls run, where they call back, and their results.

    ``dispatcher`` runs the calls (it is not closed here); without one, a
    Dispatcher with default settings is created on the first apply and closed
    by :meth:`close`. ``callback_url`` is the base URL of the app's own task
    endpoints; without one it is derived from each request's WSGI environ
    (never from its Host header). ``results_max`` and ``results_max_age``
    bound the result store.
    """

    def __init__(
        self,
        *,
        dispatcher: Dispatcher | None,
        callback_url: str | None,
        results_max: int,
        results_max_age: float,
    ) -> None:
        if dispatcher is not None and not isinstance(dispatcher, Dispatcher):
            raise TypeError(f"dispatcher must be a Dispatcher, got {type(dispatcher).__name__}")
        self.callback_url = None if callback_url is None else _checked_url(callback_url)
        if isinstance(results_max, bool) or not isinstance(results_max, int) or results_max < 1:
            raise ValueError(f"results_max must be a positive int, got {results_max!r}")
        if isinstance(results_max_age, bool) or not (
            isinstance(results_max_age, (int, float)) and results_max_age > 0
        ):
            raise ValueError(
                f"results_max_age must be a positive number of seconds, got {results_max_age!r}"
            )
        self.store: ResultStore[Result] = ResultStore(results_max, results_max_age)
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
        environ: WSGIEnvironment,
    ) -> dict[str, Any]:
        """Submit a call of the app's task ``name``; answer its id at once.

        An id already in the store is answered again without a second call,
        so a client that retries its apply with the same Idempotency-Key does
        not run the task twice.
        """
        url = f"{self.callback_base(environ)}/{name}"
        answer = {"ok": "true", "task_id": task_id}
        if not self.store.add(task_id, _Reserved(task_id)):
            return answer
        submitted = False
        try:
            dispatcher = self._dispatcher()
            result = dispatcher.apply_async(url, method, kwargs, task_id=task_id, json=json)
            submitted = True
        except EncodeError as exc:
            raise GatewayError(HTTPStatus.BAD_REQUEST, exc.message) from None
        except DispatchError as exc:  # a closed Dispatcher, an executor that refuses work
            logger.error("gateway: cannot apply %r: %s", name, exc)
            raise GatewayError(
                HTTPStatus.SERVICE_UNAVAILABLE, f"cannot apply: {exc.message}"
            ) from None
        finally:
            if not submitted:
                self.store.discard(task_id)  # nothing runs: a retry may apply it afresh
        self.store.replace(task_id, result)
        return answer

    def status(self, task_id: str) -> dict[str, Any]:
        """The seed's ``task_status``: state and result; an unknown id is ``PENDING``."""
        result = self.store.get(task_id)
        state = PENDING if result is None else result.state
        answer: dict[str, Any] = {"id": task_id, "status": state, "result": None}
        if result is not None and state == SUCCESS:
            answer["result"] = _value(result)
        elif result is not None and state == FAILURE:
            error = _value(result)
            answer["result"] = error.reason if isinstance(error, RemoteExecuteError) else str(error)
            answer["exc"] = _class_name(error)
            answer["traceback"] = _traceback(result, error)
        return {"task": answer}

    def done(self, task_id: str) -> dict[str, Any]:
        """The seed's ``is_task_done``: whether the call has finished (false when unknown)."""
        result = self.store.get(task_id)
        return {"task": {"id": task_id, "executed": result is not None and result.ready()}}

    # -- resources ----------------------------------------------------------------------

    def callback_base(self, environ: WSGIEnvironment) -> str:
        """The base URL the calls go to: ``callback_url``, else the server this request reached.

        Built from ``wsgi.url_scheme``, ``SERVER_NAME``, ``SERVER_PORT`` and
        ``SCRIPT_NAME``, never from the Host header, which the client controls.
        """
        if self.callback_url is not None:
            return self.callback_url
        scheme = str(environ.get("wsgi.url_scheme") or "http")
        host = str(environ.get("SERVER_NAME") or "")
        host = _WILDCARDS.get(host, host)
        port = str(environ.get("SERVER_PORT") or "")
        if scheme not in ("http", "https") or not _HOST.fullmatch(host) or not port.isdigit():
            raise GatewayError(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "cannot derive the callback URL from the WSGI environ; pass callback_url=",
            )
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        script = str(environ.get("SCRIPT_NAME") or "").rstrip("/")
        try:
            script = quote(script, safe="/", encoding="latin-1")  # PEP 3333: bytes as latin-1
        except UnicodeEncodeError:
            script = quote(script, safe="/")
        return f"{scheme}://{host}:{port}{script}"

    def _dispatcher(self) -> Dispatcher:
        with self._lock:
            if self._closed:
                raise GatewayError(HTTPStatus.SERVICE_UNAVAILABLE, "the gateway is closed")
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
