"""The plain values a request and its answer are made of, shared by WSGI and ASGI.

:class:`~dispatchkit.server.TaskApp` decides every request from an
:class:`HTTPRequest` (method, path, raw query, the headers it reads, where the
request arrived) and, once it needs it, the body as bytes; what it decides is
an :class:`Answer` (status, headers, body), or the work left before there is
one: a :class:`Blocking` call (a sync task, the gateway) or an
:class:`Awaiting` coroutine (an async task). Only reading the request and
writing the answer differ between the WSGI and the ASGI entry points.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from dispatchkit.server._refused import Refused

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

__all__ = [
    "HEADERS",
    "Answer",
    "Awaiting",
    "Blocking",
    "BodyNeeded",
    "Decision",
    "HTTPRequest",
    "Origin",
    "announced_length",
    "asgi_request",
    "environ_bytes",
    "from_latin1",
    "too_large",
    "wsgi_request",
]

#: The request headers TaskApp reads, by their lower-case names; no other is kept.
HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "idempotency-key",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
# The same headers as the WSGI environ names them (PEP 3333: CGI variables).
_ENVIRON_HEADERS = {
    ("HTTP_" if name not in ("content-type", "content-length") else "")
    + name.upper().replace("-", "_"): name
    for name in HEADERS
}


class Origin(NamedTuple):
    """Where a request arrived: the server's own address, never the client's Host header.

    ``host`` and ``port`` are the address the server listens on, or that the
    connection reached (``""`` when unknown, as on a Unix socket); ``script``
    is the path the app is mounted at, as raw bytes. The gateway builds its
    default ``callback_url`` from it.
    """

    scheme: str
    host: str
    port: str
    script: bytes


class HTTPRequest(NamedTuple):
    """A request as TaskApp sees it, without its body.

    ``method`` is upper-case; ``path`` is percent-decoded text relative to where
    the app is mounted; ``query`` is the raw query string as sent (the payload
    a signed GET signs); ``headers`` holds the :data:`HEADERS` that were sent,
    by lower-case name, repeated ones joined with ``,``.
    """

    method: str
    path: str
    query: bytes
    headers: Mapping[str, str]
    origin: Origin


class Answer(NamedTuple):
    """What to send back: the status, the headers (Content-Type and Content-Length
    included) and the body, which the entry points leave out for ``HEAD``."""

    status: HTTPStatus
    headers: list[tuple[str, str]]
    body: bytes


class Blocking(NamedTuple):
    """Work that may block (a sync task, the gateway): call ``run`` on a thread.

    The WSGI entry point calls it in the request's own thread; the ASGI one on
    a worker thread, so that it never blocks the event loop.
    """

    run: Callable[[], Answer]


class Awaiting(NamedTuple):
    """An async task: await ``run()`` on an event loop (the ASGI server's, or
    under WSGI the app's own loop thread)."""

    run: Callable[[], Coroutine[Any, Any, Answer]]


Decision: TypeAlias = Answer | Blocking | Awaiting


class BodyNeeded(Exception):
    """The decision needs the request body, which was not read yet.

    Raised before anything with an effect has happened (a signature
    accepted, a task run, an apply stored), so the entry point reads the body
    (bounded by ``max_body_bytes``) and asks again with it. A request that
    never needs its body (a GET, a 404, a 405) is answered without reading it.
    """


def wsgi_request(environ: WSGIEnvironment) -> HTTPRequest:
    """The request of a WSGI environ (PEP 3333: the path and query arrive as latin-1)."""
    headers = {name: str(environ[key]) for key, name in _ENVIRON_HEADERS.items() if key in environ}
    origin = Origin(
        str(environ.get("wsgi.url_scheme") or "http"),
        str(environ.get("SERVER_NAME") or ""),
        str(environ.get("SERVER_PORT") or ""),
        environ_bytes(str(environ.get("SCRIPT_NAME") or "")),
    )
    return HTTPRequest(
        str(environ.get("REQUEST_METHOD", "GET")).upper(),
        from_latin1(str(environ.get("PATH_INFO", ""))),
        environ_bytes(str(environ.get("QUERY_STRING", ""))),
        headers,
        origin,
    )


def asgi_request(scope: Mapping[str, Any]) -> HTTPRequest:
    """The request of an ASGI ``http`` scope; ``path`` is made relative to ``root_path``."""
    headers: dict[str, str] = {}
    raw_headers: Iterable[tuple[bytes, bytes]] = scope.get("headers") or ()
    for raw_name, raw_value in raw_headers:
        name = bytes(raw_name).decode("latin-1").lower()
        if name in HEADERS:
            value = bytes(raw_value).decode("latin-1")
            headers[name] = f"{headers[name]},{value}" if name in headers else value
    root_path = str(scope.get("root_path") or "")
    path = str(scope.get("path") or "")
    # ASGI servers put the mount point in front of the path (uvicorn, hypercorn do)
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    server = scope.get("server")
    host, port = ("", "") if not server or server[1] is None else (str(server[0]), str(server[1]))
    origin = Origin(str(scope.get("scheme") or "http"), host, port, root_path.encode("utf-8"))
    return HTTPRequest(
        str(scope.get("method") or "GET").upper(),
        path,
        bytes(scope.get("query_string") or b""),
        headers,
        origin,
    )


def announced_length(content_length: str, limit: int) -> int | None:
    """The Content-Length, or ``None`` when there is none; refused when bad or over ``limit``."""
    text = content_length.strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise Refused(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {text[:40]!r}")
    length = length_value(text)
    if length is None or length > limit:
        raise too_large(limit)
    return length


#: More digits than this in a Content-Length (zeros in front aside) is past any body.
LENGTH_DIGITS = 18


def length_value(digits: str) -> int | None:
    """The value of a Content-Length of ASCII ``digits``; ``None`` when it is past any
    body (``int()`` refuses 4,300 digits, zeros or not)."""
    significant = digits.lstrip("0")
    return None if len(significant) > LENGTH_DIGITS else int(significant or 0)


def too_large(limit: int) -> Refused:
    """The refusal of a body over ``max_body_bytes``."""
    return Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body exceeds {limit} bytes")


def environ_bytes(text: str) -> bytes:
    """The raw bytes of a WSGI string (PEP 3333: bytes as latin-1 characters)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:  # a server that decoded them as UTF-8
        return text.encode("utf-8")


def from_latin1(text: str) -> str:
    """What the client meant by a WSGI string: its latin-1 characters read as UTF-8."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return text
