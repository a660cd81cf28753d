"""The one error hierarchy of dispatchkit.

::

    DispatchError
    ├── UsageError                (a bad setting, method or URL; also a ValueError)
    ├── EgressDenied              (the egress policy refused the destination)
    ├── EncodeError               (an argument cannot be encoded; also a TypeError)
    ├── TransportError            (nothing usable came back)
    │   ├── ConnectError          (also a builtin ConnectionError)
    │   ├── DispatchTimeout       (connect or read; also a builtin TimeoutError)
    │   ├── CircuitOpenError      (the origin's circuit breaker is open; .retry_at)
    │   └── EndpointDisabledError (the URL answered 410 Gone and is disabled)
    ├── HTTPStatusError           (non-2xx, no envelope)
    ├── InvalidResponseError      (the body is not a valid envelope)
    │   ├── UnknownStatusError
    │   └── ResponseTooLargeError
    ├── RemoteExecuteError        (the task itself said "failure"; .reason)
    ├── ResultTimeout             (AsyncResult.get timed out; the call goes on)
    ├── SignatureError            (a Standard Webhooks signature is missing or wrong)
    └── PluginLoadError           (a plugin could not be loaded or is malformed)

Every error raised for a call carries the call's ``task_id``, ``method`` and
``url`` (secrets in the userinfo or query masked). Errors pickle with that
context, so they cross process boundaries intact; the :class:`Request` itself
(which may hold credentials in its headers) stays behind.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dispatchkit._redact import EXCERPT_BYTES, mask_url

if TYPE_CHECKING:
    from dispatchkit._models import Request

__all__ = [
    "CircuitOpenError",
    "ConnectError",
    "DispatchError",
    "DispatchTimeout",
    "EgressDenied",
    "EncodeError",
    "EndpointDisabledError",
    "HTTPStatusError",
    "InvalidResponseError",
    "PluginLoadError",
    "RemoteExecuteError",
    "ResponseTooLargeError",
    "ResultTimeout",
    "SignatureError",
    "TransportError",
    "UnknownStatusError",
    "UsageError",
    "error_from_dict",
]


class DispatchError(Exception):
    """Root of every error dispatchkit raises."""

    task_id: str | None
    method: str | None
    url: str | None
    request: Request | None

    def __init__(self, message: str, *, request: Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        if request is not None:
            self.task_id = request.task_id
            self.method = request.method
            self.url = mask_url(request.url)
        else:
            self.task_id = self.method = self.url = None

    def bind(self, request: Request) -> DispatchError:
        """Attach the call's context if the error was raised without it; return self."""
        if self.request is None and self.method is None:
            self.request = request
            self.with_context(request.task_id, request.method, request.url)
        return self

    def with_context(self, task_id: str, method: str, url: str) -> DispatchError:
        """Set the call's task id, method and URL (masked here); return self."""
        self.task_id = task_id
        self.method = method
        self.url = mask_url(url)
        return self

    def __str__(self) -> str:
        if self.method is None:
            return self.message
        if not self.task_id:  # refused before it was given an id
            return f"{self.message} [{self.method} {self.url}]"
        return f"{self.message} [{self.method} {self.url} task {self.task_id}]"

    def _state(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["request"] = None  # headers may hold credentials; context is kept below
        return state

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self._state()))

    def to_dict(self) -> dict[str, Any]:
        """The error as JSON-ready data (no Request), for :func:`error_from_dict` elsewhere."""
        data: dict[str, Any] = {"type": type(self).__name__}
        for key, value in self._state().items():
            if key != "request":
                data[key] = (
                    {"$bytes": value.decode("latin-1")} if isinstance(value, bytes) else value
                )
        return data


def error_from_dict(data: Mapping[str, Any]) -> DispatchError:
    """Rebuild an error from :meth:`DispatchError.to_dict`; only types of this hierarchy.

    An unknown type name gives a plain :class:`DispatchError`: the data never
    names what gets imported or called.
    """
    if not isinstance(data, Mapping):
        raise UsageError(f"an error record must be a mapping, not {type(data).__name__}")
    cls = _BY_NAME.get(str(data.get("type")), DispatchError)
    state = {str(key): _value(value) for key, value in data.items() if key != "type"}
    state["request"] = None
    return _rebuild(cls, state)


def _value(value: Any) -> Any:
    """A value of :meth:`DispatchError.to_dict`, with its bytes (``{"$bytes": ...}``) back."""
    if not (isinstance(value, dict) and set(value) == {"$bytes"}):
        return value
    text = value["$bytes"]
    try:
        return text.encode("latin-1")
    except (AttributeError, UnicodeEncodeError):
        raise UsageError(f"an error record's bytes must be latin-1 text, got {text!r}") from None


def _rebuild(cls: type[DispatchError], state: dict[str, Any]) -> DispatchError:
    """``cls`` with ``state``; what the state lacks (a record of an older version, or
    written by hand) takes the default its constructor would have given."""
    error = cls.__new__(cls)
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for name, value in _DEFAULTS.get(klass, {}).items():
            defaults[name] = dict(value) if isinstance(value, dict) else value  # not shared
    if issubclass(cls, RemoteExecuteError) and "reason" not in state:
        defaults["reason"] = state.get("message", "")
    state = {**defaults, **state}
    if not isinstance(state["message"], str):
        state["message"] = str(state["message"])
    Exception.__init__(error, state["message"])
    error.__dict__.update(state)
    return error


class UsageError(DispatchError, ValueError):
    """A setting, method or URL is wrong; nothing was sent."""


class EgressDenied(DispatchError):
    """The egress policy refused the destination's address; nothing was sent."""


class EncodeError(DispatchError, TypeError):
    """A keyword argument cannot be encoded for the wire; nothing was sent."""

    def __init__(self, message: str, *, argument: str, request: Request | None = None) -> None:
        super().__init__(message, request=request)
        self.argument = argument


class TransportError(DispatchError):
    """Nothing usable came back: the connection failed, dropped or timed out.

    ``transient`` says whether trying again could help (a certificate that does
    not verify will not verify on the next attempt either).
    """

    def __init__(
        self, message: str, *, request: Request | None = None, transient: bool = True
    ) -> None:
        super().__init__(message, request=request)
        self.transient = transient


class ConnectError(TransportError, ConnectionError):
    """No connection could be made; the request provably never left."""


class DispatchTimeout(TransportError, TimeoutError):
    """Connecting, reading, or waiting (for a pooled connection, a rate limit) took too long."""


class CircuitOpenError(TransportError):
    """The circuit breaker of the call's origin is open: nothing was sent.

    ``origin`` is the origin (``scheme://host:port``); ``retry_at`` is when the
    breaker lets its next probe through, in seconds since the epoch (``retry_in``:
    the seconds left until then). Never ``transient``: the built-in retry policy
    does not retry into an open breaker.
    """

    def __init__(
        self, message: str, *, origin: str, retry_at: float, request: Request | None = None
    ) -> None:
        super().__init__(message, request=request, transient=False)
        self.origin = origin
        self.retry_at = retry_at

    @property
    def retry_in(self) -> float:
        """Seconds until ``retry_at`` (0 once it has passed)."""
        return max(0.0, self.retry_at - time.time())


class EndpointDisabledError(TransportError):
    """The URL (``endpoint``, without its query) answered ``410 Gone`` and is disabled.

    Nothing was sent. It stays disabled until ``dispatcher.endpoints.enable(url)``;
    never ``transient``.
    """

    def __init__(self, message: str, *, endpoint: str, request: Request | None = None) -> None:
        super().__init__(message, request=request, transient=False)
        self.endpoint = endpoint


class HTTPStatusError(DispatchError):
    """The server answered a non-2xx status without a failure envelope.

    ``status``, ``headers`` (names lower-cased) and ``body_excerpt`` (at most 200 bytes)
    say what came back.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        request: Request | None = None,
    ) -> None:
        super().__init__(message, request=request)
        self.status = status
        self.headers = {name.lower(): value for name, value in headers.items()}
        self.body_excerpt = body[:EXCERPT_BYTES]


class InvalidResponseError(DispatchError):
    """The body is not a valid envelope (empty, not JSON, not an object, no status)."""

    def __init__(
        self,
        message: str,
        *,
        body: bytes = b"",
        status: int | None = None,
        request: Request | None = None,
    ) -> None:
        super().__init__(message, request=request)
        self.body_excerpt = body[:EXCERPT_BYTES]
        self.status = status


class UnknownStatusError(InvalidResponseError):
    """The envelope's status is neither ``"success"`` nor ``"failure"``."""


class ResponseTooLargeError(InvalidResponseError):
    """The body is larger than ``max_response_bytes``; it was not read to the end."""

    def __init__(
        self, message: str, *, limit: int, status: int | None = None, request: Request | None = None
    ) -> None:
        super().__init__(message, status=status, request=request)
        self.limit = limit


class RemoteExecuteError(DispatchError):
    """The task ran and reported ``{"status": "failure", "reason": ...}``."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        request: Request | None = None,
    ) -> None:
        super().__init__(reason, request=request)
        self.reason = reason
        self.status = status
        #: The response headers (names lower-cased) when the status was not 2xx.
        self.headers = {k.lower(): v for k, v in headers.items()} if headers else {}


class ResultTimeout(DispatchError, TimeoutError):
    """``AsyncResult.get(timeout=...)`` gave up waiting; the call itself goes on."""


class PluginLoadError(DispatchError):
    """A plugin could not be imported, registered or validated; ``.plugin`` names it."""

    def __init__(self, message: str, *, plugin: str) -> None:
        super().__init__(message)
        self.plugin = plugin


class SignatureError(DispatchError):
    """A request's Standard Webhooks signature is missing, malformed, stale or wrong.

    The message says which, for a 401 answer; it never holds a key or a signature.
    """


_BY_NAME: dict[str, type[DispatchError]] = {
    cls.__name__: cls
    for cls in (
        DispatchError,
        UsageError,
        EgressDenied,
        EncodeError,
        TransportError,
        ConnectError,
        DispatchTimeout,
        CircuitOpenError,
        EndpointDisabledError,
        HTTPStatusError,
        InvalidResponseError,
        UnknownStatusError,
        ResponseTooLargeError,
        RemoteExecuteError,
        ResultTimeout,
        SignatureError,
        PluginLoadError,
    )
}


#: What each error's constructor sets when it is not given, for :func:`_rebuild`.
_DEFAULTS: dict[type[DispatchError], dict[str, Any]] = {
    DispatchError: {"message": "", "request": None, "task_id": None, "method": None, "url": None},
    EncodeError: {"argument": ""},
    TransportError: {"transient": True},
    CircuitOpenError: {"transient": False, "origin": "", "retry_at": 0.0},
    EndpointDisabledError: {"transient": False, "endpoint": ""},
    HTTPStatusError: {"status": 0, "headers": {}, "body_excerpt": b""},
    InvalidResponseError: {"status": None, "body_excerpt": b""},
    ResponseTooLargeError: {"limit": 0},
    RemoteExecuteError: {"reason": "", "status": None, "headers": {}},
    PluginLoadError: {"plugin": ""},
}
