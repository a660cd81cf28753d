"""The OpenTelemetry HTTP semantic conventions (stable) as this plugin applies them.

Names of attributes and instruments, the known methods, the bucket
boundaries, and the redaction of URLs: plain Python, no OpenTelemetry import,
shared by the client side (:mod:`dispatchkit_otel._client`) and the server
side (:mod:`dispatchkit_otel.server`).
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import unquote_plus, urlsplit, urlunsplit

# What dispatchkit itself masks in its messages is masked in telemetry too, the same way.
from dispatchkit._redact import SECRET_NAME

#: The instrumentation scope of every tracer and meter: ``dispatchkit``.
SCOPE = "dispatchkit"
try:
    SCOPE_VERSION: str | None = version("dispatchkit-otel")
except PackageNotFoundError:  # run from a source tree that is not installed
    SCOPE_VERSION = None
#: The semantic conventions version the attributes follow (HTTP is stable since 1.23).
SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"

HTTP_REQUEST_METHOD = "http.request.method"
HTTP_REQUEST_METHOD_ORIGINAL = "http.request.method_original"
HTTP_REQUEST_RESEND_COUNT = "http.request.resend_count"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
HTTP_ROUTE = "http.route"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
CLIENT_ADDRESS = "client.address"
NETWORK_PEER_ADDRESS = "network.peer.address"
NETWORK_PEER_PORT = "network.peer.port"
NETWORK_PROTOCOL_VERSION = "network.protocol.version"
URL_FULL = "url.full"
URL_PATH = "url.path"
URL_QUERY = "url.query"
URL_SCHEME = "url.scheme"
USER_AGENT_ORIGINAL = "user_agent.original"
#: dispatchkit's own: the call's ``Idempotency-Key``, and how many attempts it made.
TASK_ID = "dispatchkit.task_id"
ATTEMPTS = "dispatchkit.attempts"
ATTEMPT = "dispatchkit.attempt"

#: The span of a whole call (INTERNAL: an HTTP client span per attempt is its child).
CALL_SPAN = "dispatchkit.call"
#: The event on the call span for an attempt that ended before anything was sent.
REFUSED_EVENT = "dispatchkit.attempt.refused"

CLIENT_REQUEST_DURATION = "http.client.request.duration"
SERVER_REQUEST_DURATION = "http.server.request.duration"
CALL_DURATION = "dispatchkit.call.duration"
CALL_RETRIES = "dispatchkit.call.retries"
ATTEMPTS_REFUSED = "dispatchkit.attempt.refused"
#: Waits for a connection of a full pool. The HTTP conventions have none (their
#: ``http.client.connection.duration`` is a connection's life, ``http.client.open_connections``
#: a count); the name follows the database conventions' ``db.client.connection.wait_time``.
CONNECTION_WAIT_TIME = "dispatchkit.client.connection.wait_time"
#: The endpoint guard's circuit breakers: 1 for an origin's state, 0 for the two others,
#: the way the conventions give a state (``hw.status`` and ``hw.state``).
BREAKER_STATE = "dispatchkit.circuit_breaker.state"
BREAKER_STATES = ("closed", "open", "half-open")

#: The ``ExplicitBucketBoundaries`` advice of ``http.{client,server}.request.duration``.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
#: A call's duration includes its retries and their waits: the same start, a longer tail.
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: The database conventions' advice for ``db.client.connection.wait_time``: from 1 ms.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10)

#: RFC 9110's methods, PATCH (RFC 5789) and QUERY; ``OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS``
#: (comma-separated) replaces the list, as the conventions require.
DEFAULT_KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)
KNOWN_METHODS_ENV = "OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS"
OTHER = "_OTHER"
REDACTED = "REDACTED"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def known_methods() -> frozenset[str]:
    """The methods that keep their name; any other is ``_OTHER`` (read once per user)."""
    value = os.environ.get(KNOWN_METHODS_ENV)
    if value is None:
        return DEFAULT_KNOWN_METHODS
    return frozenset(name.strip() for name in value.split(",") if name.strip())


def method_attributes(method: str, known: frozenset[str]) -> tuple[str, dict[str, str]]:
    """The span name's ``{method}`` and the method attributes of ``method``."""
    if method in known:
        return method, {HTTP_REQUEST_METHOD: method}
    return "HTTP", {HTTP_REQUEST_METHOD: OTHER, HTTP_REQUEST_METHOD_ORIGINAL: method}


def redact_query(query: str) -> str:
    """``query`` with the value of every secret-looking key replaced by ``REDACTED``.

    The keys are dispatchkit's (``token``, ``key``, ``sig``, ``secret``, ...;
    a superset of the conventions' ``X-Amz-Signature``, ``sig``, ...); every
    other pair is kept exactly as it was encoded.
    """
    if not query or not SECRET_NAME.search(query):
        return query
    pairs = []
    for pair in query.split("&"):
        key, equals, _value = pair.partition("=")
        if equals and SECRET_NAME.search(unquote_plus(key)):
            pair = f"{key}={REDACTED}"
        pairs.append(pair)
    return "&".join(pairs)


def redact_url(url: str) -> str:
    """``url`` for ``url.full``: user and password are ``REDACTED:REDACTED``, secrets too.

    Never raises: what cannot be parsed is given with its query redacted only.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        base, mark, query = url.partition("?")
        return base + mark + redact_query(query)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}:{REDACTED}@{netloc.rpartition('@')[2]}"
    query = redact_query(parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_server(url: str) -> tuple[str, int | None]:
    """``server.address`` and ``server.port`` of ``url`` (the scheme's port when none is said)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "", None
    return parts.hostname or "", port if port is not None else _DEFAULT_PORTS.get(parts.scheme)


def host_server(host: str, scheme: str) -> tuple[str, int | None]:
    """``server.address`` and ``server.port`` of a ``Host`` header (``[::1]:80`` too)."""
    host = host.strip()
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        address, _, port_text = host.partition(":")
    if port_text.isdigit():
        return address.lower(), int(port_text)
    return address.lower(), _DEFAULT_PORTS.get(scheme)


def error_type(exc: BaseException) -> str:
    """``error.type`` of an exception: its class, fully qualified (a builtin's name alone)."""
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
