"""Value types of a call, and the two strategy protocols plugins implement."""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from dispatchkit._checks import MAX_SECONDS
from dispatchkit._redact import excerpt, mask_url
from dispatchkit.exceptions import InvalidResponseError, UnknownStatusError, UsageError

if TYPE_CHECKING:
    from dispatchkit._endpoints import Ticket

#: The two statuses of an envelope.
STATUS_SUCCESS: Literal["success"] = "success"
STATUS_FAILURE: Literal["failure"] = "failure"

_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "webhook-signature"})
#: The options of a call that has none: shared, read-only.
NO_OPTIONS: Mapping[str, str] = MappingProxyType({})


@dataclass(slots=True, eq=False)
class Request:
    """One call on its way out; ``prepare_request`` hooks may edit ``headers``.

    ``url`` is the URL that is sent (for GET, HEAD, DELETE and OPTIONS it holds
    the encoded arguments); ``kwargs`` are the task's arguments as given;
    ``body`` is the encoded body or ``None``; ``attempt`` counts from 1;
    ``attempts``, when not ``None``, receives an :class:`Attempt` as each
    attempt ends (``Dispatcher.execute(call, attempts=...)``); ``options`` are
    the call's plugin options (``Dispatcher.apply(..., options=...)``), read-only
    and never sent by the core: a plugin reads the ones it knows, such as
    ``signing_key``.
    """

    method: str
    url: str
    kwargs: Mapping[str, Any]
    headers: dict[str, str]
    body: bytes | None
    task_id: str
    timeout: float
    attempt: int = 0
    attempts: list[Attempt] | None = None
    options: Mapping[str, str] = field(default_factory=lambda: NO_OPTIONS)
    # (time.time(), time.perf_counter()) when the current attempt began, while attempts
    # are recorded (a list or a dispatchkit_attempt_done hook); else None, and no clock read.
    _began: tuple[float, float] | None = field(default=None, init=False)
    # The call's keys and slot with the endpoint guard, when there is one.
    _ticket: Ticket | None = field(default=None, init=False)
    # Seconds the current attempt waited for a connection of a full pool: added to by the
    # built-in transports while the attempt is recorded (``_began`` set), taken by its record.
    _pool_wait: float = field(default=0.0, init=False)

    def __repr__(self) -> str:
        headers = {
            k: ("***" if k.lower() in _SECRET_HEADERS else v) for k, v in self.headers.items()
        }
        return (
            f"Request(method={self.method!r}, url={mask_url(self.url)!r}, "
            f"task_id={self.task_id!r}, attempt={self.attempt}, headers={headers!r})"
        )


#: How much of an answer's body an :class:`Attempt` keeps.
ATTEMPT_BODY_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of a call, as it ended: when, how long, and what came back.

    ``number`` counts from 1 (the request's ``attempt``); ``started`` is when
    it began, in seconds since the epoch (UTC, to the microsecond), and
    ``duration`` how long it took, in seconds. ``outcome`` is the answer's
    status as a string (``"200"``, ``"503"``) or, when no answer came, the
    error's type name (``"ConnectError"``, ``"DispatchTimeout"``). ``error``
    is the error's message, secrets in URLs masked (``None`` for a success; a
    2xx failure envelope is an answer with an error); ``body`` the first KiB
    of the answer's body as text (``None`` when none came); ``worker`` is
    ``host:pid`` of the process that ran it. ``pool_wait`` is the part of
    ``duration`` spent waiting for a connection because every connection of
    the origin's pool was in use (``pool_maxsize``), in seconds: ``0.0`` when
    it did not wait, or when its transport does not say (the built-in ones do).
    """

    number: int
    started: float
    duration: float
    outcome: str
    status: int | None
    error: str | None
    body: str | None
    worker: str
    pool_wait: float = 0.0

    @property
    def started_at(self) -> datetime:
        """``started`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.started, timezone.utc)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data; ``started`` is an ISO 8601 string in UTC.

        ``"pool_wait"`` only when the attempt waited, so that a process of an older
        version, and a record of an attempt that did not wait, read the same.
        """
        data = {
            "number": self.number,
            "started": self.started_at.isoformat(timespec="microseconds"),
            "duration": self.duration,
            "outcome": self.outcome,
            "status": self.status,
            "error": self.error,
            "body": self.body,
            "worker": self.worker,
        }
        if self.pool_wait:
            data["pool_wait"] = self.pool_wait
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Attempt:
        """Read :meth:`to_dict`'s data back; anything malformed is a :class:`UsageError`.

        Keys it does not know are ignored, so that a newer writer's records still read.
        """
        if not isinstance(data, Mapping):
            raise UsageError(f"an attempt must be a mapping, not {type(data).__name__}")
        for key, kinds in _ATTEMPT_KEYS.items():
            if key not in data:
                raise UsageError(f"an attempt needs {key!r}")
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise UsageError(f"attempt {key!r} has the wrong type: {value!r}")
        number, duration = data["number"], data["duration"]
        if number < 1:
            raise UsageError(f"attempt 'number' counts from 1, got {number!r}")
        if not 0 <= duration <= MAX_SECONDS:
            raise UsageError(f"attempt 'duration' must be finite seconds >= 0, got {duration!r}")
        pool_wait = data.get("pool_wait", 0.0)
        if isinstance(pool_wait, bool) or not isinstance(pool_wait, (int, float)):
            raise UsageError(f"attempt 'pool_wait' has the wrong type: {pool_wait!r}")
        if not 0 <= pool_wait <= MAX_SECONDS:
            raise UsageError(f"attempt 'pool_wait' must be finite seconds >= 0, got {pool_wait!r}")
        return cls(
            number=number,
            started=_utc_seconds(data["started"]),
            duration=float(duration),
            outcome=data["outcome"],
            status=data["status"],
            error=data["error"],
            body=data["body"],
            worker=data["worker"],
            pool_wait=float(pool_wait),
        )


_NONE = type(None)
_ATTEMPT_KEYS: dict[str, tuple[type, ...]] = {
    "number": (int,),
    "started": (str,),
    "duration": (int, float),
    "outcome": (str,),
    "status": (int, _NONE),
    "error": (str, _NONE),
    "body": (str, _NONE),
    "worker": (str,),
}


def _utc_seconds(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 time with its offset (``Z`` or ``+00:00``)."""
    if text.endswith(("Z", "z")):  # datetime.fromisoformat reads "Z" from Python 3.11 on
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"attempt 'started' is not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        raise UsageError(f"attempt 'started' has no UTC offset: {text!r}")
    seconds = moment.timestamp()
    try:  # as started_at will read it: year 1 at +14:00 is year 0 in UTC
        datetime.fromtimestamp(seconds, timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise UsageError(f"attempt 'started' is out of range in UTC: {text!r}") from None
    return seconds


@dataclass(frozen=True, slots=True)
class Call:
    """One call as the caller asked for it, before encoding: what an executor ships.

    Plain data (str, numbers, lists, dicts), so that it crosses process
    boundaries as JSON; ``Dispatcher.execute(call)`` runs it anywhere.
    ``options`` are plugin options, names to short strings (see
    ``docs/plugins.md``), resolved where the call is sent: they travel with the
    call, so they name things (``{"signing_key": "acme"}``) and never hold a
    secret.
    """

    url: str
    method: str = "GET"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    task_id: str = ""
    timeout: float | None = None
    headers: Mapping[str, str] | None = None
    json: bool = False
    options: Mapping[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data; ``"options"`` only when the call has some.

        Left out otherwise, so that a process of an older version, which does
        not know the key, still reads calls without options.
        """
        data = {
            "url": self.url,
            "method": self.method,
            "kwargs": dict(self.kwargs),
            "task_id": self.task_id,
            "timeout": self.timeout,
            "headers": dict(self.headers) if self.headers else None,
            "json": self.json,
        }
        if self.options:
            data["options"] = dict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Call:
        """Read :meth:`to_dict`'s data back; a :class:`UsageError` for what is not a call
        (the values themselves are checked where the call is built)."""
        if not isinstance(data, Mapping):
            raise UsageError(f"a call must be a mapping, not {type(data).__name__}")
        unknown = [str(key) for key in data if key not in _CALL_FIELDS]
        if unknown:
            raise UsageError(f"a call has no field(s) {', '.join(map(repr, sorted(unknown)))}")
        if "url" not in data:
            raise UsageError("a call needs a 'url'")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Response:
    """What a transport got back: the status, the headers and the whole body.

    ``headers`` should be case-insensitive (urllib3's ``HTTPHeaderDict`` is);
    :meth:`header` also copes with a plain ``dict``.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str, default: str | None = None) -> str | None:
        """Return header ``name`` looked up without regard to case."""
        value = self.headers.get(name)
        if value is not None:
            return value
        lowered = name.lower()
        for key, candidate in self.headers.items():
            if key.lower() == lowered:
                return candidate
        return default

    @property
    def media_type(self) -> str:
        """The Content-Type without parameters, lower-cased; ``""`` when absent."""
        content_type = self.header("content-type")
        if not content_type:
            return ""
        return content_type.partition(";")[0].strip().lower()


def _text(reason: object) -> str:
    """A failure's ``reason`` as text: ``str()``, bounded for one nested past Python's limit."""
    if isinstance(reason, str):
        return reason
    try:
        return str(reason)
    except RecursionError:  # a hostile answer: [[[...]]] a thousand deep
        return reprlib.repr(reason)


@dataclass(frozen=True, slots=True)
class Envelope:
    """The task's answer: ``status`` is ``"success"`` (with ``retval``) or ``"failure"``."""

    status: str
    retval: Any = None
    reason: str | None = None

    @classmethod
    def success(cls, retval: Any = None) -> Envelope:
        return cls(STATUS_SUCCESS, retval=retval)

    @classmethod
    def failure(cls, reason: str) -> Envelope:
        return cls(STATUS_FAILURE, reason=reason)

    @classmethod
    def from_object(cls, obj: object, body: bytes = b"") -> Envelope:
        """Validate a decoded JSON value as an envelope; codecs share this.

        Raises :class:`InvalidResponseError` when ``obj`` is not an object with a
        ``status``, and :class:`UnknownStatusError` for any status but the two.
        ``body`` is only quoted in messages.
        """
        if not isinstance(obj, dict):
            raise InvalidResponseError(
                f"envelope must be a JSON object, got {type(obj).__name__}: {excerpt(body)}",
                body=body,
            )
        try:
            status = obj["status"]
        except KeyError:
            raise InvalidResponseError(
                f'envelope has no "status": {excerpt(body)}', body=body
            ) from None
        if status == STATUS_SUCCESS:
            return cls(STATUS_SUCCESS, retval=obj.get("retval"))
        if status == STATUS_FAILURE:
            reason = obj.get("reason")
            return cls(STATUS_FAILURE, reason="" if reason is None else _text(reason))
        raise UnknownStatusError(
            f"unknown envelope status {reprlib.repr(status)}: {excerpt(body)}", body=body
        )

    def to_object(self) -> dict[str, Any]:
        """The JSON-ready mapping of this envelope."""
        if self.status == STATUS_FAILURE:
            return {"status": STATUS_FAILURE, "reason": self.reason or ""}
        return {"status": self.status, "retval": self.retval}


@runtime_checkable
class Result(Protocol):
    """What ``Dispatcher.submit`` returns, whichever executor ran the call.

    :class:`~dispatchkit.AsyncResult` is the local one; an executor plugin
    (Celery) returns its own with the same interface.
    """

    @property
    def id(self) -> str: ...

    @property
    def state(self) -> str: ...

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any: ...

    def ready(self) -> bool: ...

    def successful(self) -> bool: ...

    def failed(self) -> bool: ...


@runtime_checkable
class Executor(Protocol):
    """Runs submitted calls; returned by the ``dispatchkit_executor`` hook.

    Optional: ``submit_many(calls: Sequence[Call]) -> list[Result]``, the handles
    of ``calls`` in order, for :meth:`Dispatcher.submit_many` and
    :meth:`Dispatcher.submit_calls` to hand over a whole batch at once (the
    Celery executor sends it in chunks; the calls may go to different URLs). An
    executor without it gets each call through ``submit``.
    """

    def submit(self, call: Call) -> Result: ...

    def shutdown(self, wait: bool = True) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """Sends a :class:`Request` and returns the whole :class:`Response`.

    Raise :class:`~dispatchkit.TransportError` (or a subclass) when nothing
    usable came back; any status code is a normal return.
    """

    def send(self, request: Request) -> Response: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncTransport(Protocol):
    """The asyncio twin of :class:`Transport`, for the AsyncDispatcher.

    ``send`` must be cancellable: when the awaiting task is cancelled, the
    request's connection is dropped (never reused half-read) and
    :class:`asyncio.CancelledError` propagates.
    """

    async def send(self, request: Request) -> Response: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Codec(Protocol):
    """Turns a response body into an :class:`Envelope`, and back on the server side."""

    media_type: str

    def decode(self, response: Response) -> Envelope: ...

    def encode(self, envelope: Envelope) -> bytes: ...


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One registered plugin, as :attr:`Dispatcher.plugins` lists it."""

    name: str
    hooks: tuple[str, ...]
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    plugin: object = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended, as ``dispatchkit_call_done`` sees it.

    Exactly one of ``retval`` (when ``error`` is ``None``) and ``error`` is
    meaningful; ``duration`` is in seconds, over all attempts.
    """

    retval: Any
    error: BaseException | None
    duration: float
    attempts: int

    @property
    def ok(self) -> bool:
        return self.error is None


_CALL_FIELDS = frozenset(Call.__dataclass_fields__)
