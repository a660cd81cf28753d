"""Built-in transport: urllib3 connection pools, one set per Dispatcher.

Pools are kept per origin in a least-recently-used map of at most
``max_pools`` (the request path skips PoolManager's per-request URL parsing
and key building, which cost more than the rest of our pipeline). Keep-alive
pooling per host, http and https (certificates verified unless
``verify=False``), redirects never followed, bodies read in chunks and
refused past ``max_response_bytes`` without being held in memory. Every
urllib3 error is translated here, once, into the dispatchkit hierarchy.

Proxies (``proxy``, ``trust_env``: :mod:`dispatchkit.builtin._proxy`) are
decided once per origin, when its pool is made; a pool made without one is
exactly the pool made before proxies existed. A proxied pool keeps the fast
path (``_exchange``, the watchdog, the strict head reader): only its
connection class differs. An http origin's pool holds connections *to the
proxy* and sends absolute-form requests with ``Proxy-Authorization``
(:class:`_Forwarding`); an https origin's pool opens each connection with
``CONNECT`` (http.client's tunnel, the credentials on the ``CONNECT`` only),
then TLS with the target, verified as a direct connection is
(:class:`_Tunneling`); a SOCKS proxy uses urllib3's SOCKS connections
(``urllib3.contrib.socks``, PySocks). The egress policy cannot see where a
proxy connects: it checks an IP-literal target when the pool is made, and
leaves the proxy's own address alone (the operator chose it).
"""

from __future__ import annotations

import functools
import http.client
import importlib
import re
import socket
import ssl
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import unquote

import urllib3
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection, ProxyConfig
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    DecodeError,
    EmptyPoolError,
    HTTPError,
    InsecureRequestWarning,
    LocationValueError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import Url, make_headers, parse_url

from dispatchkit._egress import EgressPolicy, connect_guarded
from dispatchkit._encoding import SENT_AS_IS, check_headers
from dispatchkit._models import Request, Response
from dispatchkit._redact import mask_url
from dispatchkit._redirects import REDIRECT_STATUSES, SCHEMES, next_hop
from dispatchkit._watchdog import Watchdog
from dispatchkit.builtin._proxy import SOCKS_EXTRA, Proxy, ProxyRoutes, proxy_routes
from dispatchkit.builtin._response_head import StrictHeadResponse, UnaskedSwitch
from dispatchkit.exceptions import (
    ConnectError,
    DispatchError,
    DispatchTimeout,
    EgressDenied,
    InvalidResponseError,
    ResponseTooLargeError,
    TransportError,
    UsageError,
)
from dispatchkit.hookspecs import hookimpl

if TYPE_CHECKING:
    from urllib3._base_connection import BaseHTTPConnection
    from urllib3.response import BaseHTTPResponse

    from dispatchkit._dispatcher import Dispatcher
    from dispatchkit._settings import Settings

CHUNK = 64 * 1024
# scheme://authority, then the request target; a fragment is never sent.
_ORIGIN = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)([^#]*)")


class PoolTransport:
    """Sends requests over pooled keep-alive connections (through ``routes``' proxies)."""

    def __init__(self, settings: Settings, routes: ProxyRoutes | None = None) -> None:
        self._limit = settings.max_response_bytes
        self._max_pools = settings.max_pools
        self._pool_kw: dict[str, Any] = {
            "maxsize": settings.pool_maxsize,
            # Blocking keeps at most pool_maxsize connections per host: a thread
            # waits (up to the timeout) instead of opening one the pool would discard.
            "block": True,
            "retries": False,
            "timeout": urllib3.Timeout(connect=settings.timeout, read=settings.timeout),
        }
        self._tls_kw: dict[str, Any] = {
            "cert_reqs": ssl.CERT_REQUIRED if settings.verify else ssl.CERT_NONE,
            "ca_certs": settings.ca_certs,
            "cert_file": settings.client_cert,
            "key_file": settings.client_key,
        }
        self._watchdog = Watchdog()
        policy = EgressPolicy(settings.egress_allow) if settings.egress == "public" else None
        self._connection_classes = _connection_classes(self._watchdog, policy)
        self._policy = policy
        self._routes = routes
        # The proxy's own address is the operator's choice: no egress policy on its connections.
        self._proxied = None if routes is None else _ProxiedClasses(self._watchdog, routes)
        self._deadline = settings.deadline
        self._warn_unverified = not settings.verify
        self._follow = settings.follow_redirects
        # origin ("https://user:pw@host:port") -> (pool, Authorization header or None), LRU order.
        self._pools: OrderedDict[str, tuple[HTTPConnectionPool, str | None]] = OrderedDict()
        self._lock = threading.Lock()
        # The pool used last, read without the lock (one tuple: replaced atomically).
        self._last: tuple[str, tuple[HTTPConnectionPool, str | None]] | None = None
        self._closed = False

    def send(self, request: Request) -> Response:
        total = self._deadline or DEADLINE_FACTOR * request.timeout
        deadline = time.monotonic() + total
        _current.deadline = deadline
        try:
            url, method, body = request.url, request.method, request.body
            headers: Mapping[str, str] = request.headers
            for hop in range(self._follow + 1):
                raw = self._open(request, url, method, body, headers)
                if raw.status not in REDIRECT_STATUSES or hop == self._follow:
                    break
                location = raw.headers.get("location")
                if not location:
                    break
                self._read(raw, request)  # drained, so that the connection is reused
                url, method, body, headers = next_hop(
                    url, location, raw.status, method, body, headers
                )
            body = self._read(raw, request)
            if time.monotonic() >= deadline:
                # The watchdog may have cut the answer short anywhere, even where
                # http.client takes the cut for a complete (empty) answer.
                raise TransportError("the answer was cut off", request=request)
            return Response(raw.status, raw.headers, body)
        except TransportError as exc:
            if time.monotonic() >= deadline:
                raise DispatchTimeout(
                    f"attempt ran past its total deadline of {total:g}s", request=request
                ) from exc
            raise
        finally:
            _current.deadline = None

    def _open(
        self,
        request: Request,
        url: str,
        method: str,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> BaseHTTPResponse:
        match = _ORIGIN.match(url)
        if match is None:
            raise UsageError(f"invalid URL {mask_url(url)!r}", request=request)
        origin, target = match.group(1, 2)
        pool, auth = self._pool_for(origin, request)
        if auth is not None and not any(name.lower() == "authorization" for name in headers):
            headers = {**headers, "Authorization": auth}
        if not SENT_AS_IS.fullmatch(target):
            target = parse_url(url).request_uri  # spaces, non-ASCII: encoded as urllib3 would
        elif not target.startswith("/"):
            target = "/" + target
        return self._exchange(pool, request, method, target, body, headers)

    def _exchange(
        self,
        pool: HTTPConnectionPool,
        request: Request,
        method: str,
        target: str,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> BaseHTTPResponse:
        """One request and the head of its answer, on a connection taken from ``pool``.

        This is ``pool.urlopen`` without what it redoes per call and we never use
        (retries, redirects, timeout objects, host checks, proxies): about a tenth
        of the CPU time of a keep-alive call.
        """
        timeout = request.timeout
        try:
            # Waits at most ``timeout`` for a free connection; a dropped idle one is replaced.
            if request._began is not None and _exhausted(pool):  # recorded, and it will wait
                conn = _waited_conn(pool, request)
            else:
                conn = pool._get_conn(timeout=timeout)
        except HTTPError as exc:
            # Nothing was taken from the pool, so nothing goes back (urlopen does the same).
            _translate(exc, request)
        try:
            conn.timeout = timeout  # connect, and every read and write after it
            if self._warn_unverified and pool.scheme == "https":
                warnings.warn(
                    f"Unverified HTTPS request to host {pool.host!r} (verify=False)",
                    InsecureRequestWarning,
                    stacklevel=2,
                )
            try:
                conn.request(method, target, body=body, headers=headers, preload_content=False)
            except BrokenPipeError:
                pass  # the server may answer and close before reading the whole body
            except ValueError as exc:
                if isinstance(exc, OSError):  # ssl.CertificateError is both
                    raise
                # A header (a plugin's?) http.client will not write: nothing was sent.
                raise _unsendable(exc, method, target, headers, request) from exc
            response = conn.getresponse()
        except BaseException as exc:
            conn.close()
            pool._put_conn(conn)  # taken, so it goes back: closed, it reconnects when next used
            if isinstance(exc, HTTPError):
                _translate(exc, request)
            if isinstance(exc, Exception) and not isinstance(exc, DispatchError):
                _translate_socket(exc, request)
            raise
        # So that release_conn() returns the connection to its pool, as urlopen arranges.
        response._pool = pool  # type: ignore[attr-defined]
        response._connection = conn  # type: ignore[attr-defined]
        return response

    def _pool_for(self, origin: str, request: Request) -> tuple[HTTPConnectionPool, str | None]:
        last = self._last
        if last is not None and last[0] == origin:
            return last[1]  # already the most recently used: no reordering to do
        with self._lock:
            entry = self._pools.get(origin)
            if entry is not None:
                self._pools.move_to_end(origin)
                self._last = (origin, entry)
                return entry
            if self._closed:
                raise UsageError("the transport is closed", request=request)
            entry = self._new_pool(origin, request)
            self._pools[origin] = entry
            self._last = (origin, entry)
            if len(self._pools) > self._max_pools:
                _, (evicted, _) = self._pools.popitem(last=False)
                # Connections in use are closed when they come back to a closed pool.
                evicted.close()
            return entry

    def _new_pool(self, origin: str, request: Request) -> tuple[HTTPConnectionPool, str | None]:
        try:
            url = parse_url(origin)
        except LocationValueError as exc:
            raise UsageError(f"invalid URL: {exc}", request=request) from exc
        if not url.host:
            raise UsageError(f"URL has no host: {mask_url(request.url)!r}", request=request)
        auth = None
        if url.auth is not None:
            auth = make_headers(basic_auth=unquote(url.auth))["authorization"]
        if self._routes is not None and url.scheme in ("http", "https"):
            proxy = self._routes.route(url.scheme, url.host, url.port)
            if proxy is not None:
                return self._proxied_pool(origin, url, proxy, request), auth
        if url.scheme == "https":
            _refuse_http2(request)
            pool: HTTPConnectionPool = HTTPSConnectionPool(
                url.host, url.port, **self._pool_kw, **self._tls_kw
            )
        elif url.scheme == "http":
            pool = HTTPConnectionPool(url.host, url.port, **self._pool_kw)
        else:
            raise UsageError(f"unsupported scheme {url.scheme!r}", request=request)
        pool.ConnectionCls = self._connection_classes[url.scheme == "https"]
        return pool, auth

    def _proxied_pool(
        self, origin: str, url: Url, proxy: Proxy, request: Request
    ) -> HTTPConnectionPool:
        """The pool of an origin reached through ``proxy`` (see the module docstring)."""
        host = url.host or ""
        if self._policy is not None and self._policy.refuses_literal(host):
            # The proxy resolves names; an address literal is the one thing we can check.
            raise EgressDenied(
                f"egress policy refuses {host}: not a public address", request=request
            )
        https = url.scheme == "https"
        if https or proxy.scheme == "https":
            _refuse_http2(request)
        assert self._proxied is not None
        classes = self._proxied
        port = url.port or (443 if https else 80)
        authority = origin.partition("://")[2].rpartition("@")[2]  # no userinfo to the proxy
        route = _Route(proxy, host.strip("[]"), port, f"{url.scheme}://{authority}")
        kw: dict[str, Any] = {**self._pool_kw, "dk_route": route}
        if proxy.is_socks:
            kw["_socks_options"] = classes.socks_options(proxy)
            if https:
                pool: HTTPConnectionPool = HTTPSConnectionPool(host, url.port, **kw, **self._tls_kw)
            else:
                pool = HTTPConnectionPool(host, url.port, **kw)
            assert classes.socks is not None  # made with the routes, PySocks checked
            pool.ConnectionCls = classes.socks[https]
            return pool
        # urllib3 turns Nagle's algorithm on for proxied pools; keep ours off (delayed ACKs).
        kw["socket_options"] = HTTPConnection.default_socket_options
        if https:
            pool = HTTPSConnectionPool(
                host,
                url.port,
                _proxy=parse_url(proxy.url),
                _proxy_headers=proxy.headers,
                _proxy_config=ProxyConfig(None, False, None, None),
                **kw,
                **self._tls_kw,
            )
            pool.ConnectionCls = classes.tunneling
        elif proxy.scheme == "https":
            # Only the proxy's certificate is checked here (the target is plain http): verified
            # as a target's would be, and no client certificate is shown to the proxy.
            tls = {"cert_reqs": self._tls_kw["cert_reqs"], "ca_certs": self._tls_kw["ca_certs"]}
            pool = HTTPSConnectionPool(proxy.host, proxy.port, **kw, **tls)
            pool.ConnectionCls = classes.forwarding[True]
        else:
            pool = HTTPConnectionPool(proxy.host, proxy.port, **kw)
            pool.ConnectionCls = classes.forwarding[False]
        return pool

    def _read(self, raw: BaseHTTPResponse, request: Request) -> bytes:
        limit = self._limit
        try:
            length = raw.length_remaining
            if length is not None and length > limit:
                raise body_too_large(limit, raw.status, request, length)
            if length is not None and "content-encoding" not in raw.headers:
                body = raw.read()
            else:
                body = self._read_chunks(raw, request)
        except HTTPError as exc:
            raw.close()
            _translate(exc, request)
        except BaseException:
            raw.close()  # unread bytes make the connection unusable: drop it
            raise
        finally:
            conn = raw.connection
            if conn is not None:
                # Before it goes back: the next user must not inherit this attempt's deadline.
                conn._dk_deadline = None  # type: ignore[attr-defined]
            raw.release_conn()
        return body

    def _read_chunks(self, raw: BaseHTTPResponse, request: Request) -> bytes:
        limit = self._limit
        chunks: list[bytes] = []
        size = 0
        while chunk := raw.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit, raw.status, request)
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = [pool for pool, _ in self._pools.values()]
            self._pools.clear()
            self._last = None
        for pool in pools:
            pool.close()
        self._watchdog.close()


#: Without a ``deadline`` setting, an attempt may last this many times its ``timeout``.
DEADLINE_FACTOR = 6


def _exhausted(pool: HTTPConnectionPool) -> bool:
    """Whether every connection of ``pool`` is in use (``pool_maxsize``): a taker waits.

    The queue holds the idle connections and a placeholder per connection not
    made yet; empty, the pool is full. A snapshot, read only for attempts that
    are recorded.
    """
    idle = pool.pool
    return idle is not None and idle.empty()


def _waited_conn(pool: HTTPConnectionPool, request: Request) -> BaseHTTPConnection:
    """A connection of the full ``pool``; the wait goes to the attempt's record."""
    start = time.perf_counter()
    try:
        conn = pool._get_conn(timeout=request.timeout)
    finally:  # a wait that ran out (no connection in time) counts too
        request._pool_wait += time.perf_counter() - start
    return conn


def body_too_large(
    limit: int, status: int, request: Request, length: int | None = None
) -> ResponseTooLargeError:
    """The error for a body past ``max_response_bytes`` (``length``: as announced)."""
    size = "response body" if length is None else f"response body of {length} bytes"
    return ResponseTooLargeError(
        f"{size} exceeds max_response_bytes={limit}", limit=limit, status=status, request=request
    )


_current = threading.local()


class _Watched:
    """Mixin for urllib3 connections: the watchdog bounds their sockets; ``_policy`` guards them."""

    response_class = StrictHeadResponse
    _watchdog: Watchdog
    _policy: EgressPolicy | None
    _dk_deadline: float | None = None
    sock: socket.socket | None

    def request(self, *args: Any, **kwargs: Any) -> None:
        # Set before a lazy connect, so that the deadline bounds the TLS handshake too.
        self._dk_deadline = getattr(_current, "deadline", None)
        super().request(*args, **kwargs)  # type: ignore[misc]

    def _new_conn(self) -> socket.socket:
        if self._policy is None:
            sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        else:
            sock = connect_guarded(self, self._policy)
        self._watchdog.watch(self)
        return sock

    def close(self) -> None:
        self._watchdog.unwatch(self)
        super().close()  # type: ignore[misc]


def _connection_classes(
    watchdog: Watchdog, policy: EgressPolicy | None
) -> tuple[type[HTTPConnection], type[HTTPSConnection]]:
    """urllib3 connection classes bound to this transport's watchdog and egress policy."""
    attributes = {"_watchdog": watchdog, "_policy": policy}
    return (
        type("WatchedHTTPConnection", (_Watched, HTTPConnection), attributes),
        type("WatchedHTTPSConnection", (_Watched, HTTPSConnection), attributes),
    )


PROXY_AUTHENTICATION_REQUIRED = 407
# http.client's (and urllib3's backported) tunnel error, the one way it reports the status.
_TUNNEL_FAILED = re.compile(r"Tunnel connection failed: (\d{3}) ?(.*)", re.DOTALL)


@dataclass(frozen=True)
class _Route:
    """How a proxied pool's connections reach its origin: the proxy, and the target."""

    proxy: Proxy
    host: str  # without brackets
    port: int
    origin: str  # scheme://host[:port], prefixed to the request target by a forwarding proxy


class ProxyRefused(OSError):
    """The proxy answered ``CONNECT`` (or a forwarded request) with an error status."""

    def __init__(self, proxy: Proxy, status: int, reason: str, what: str) -> None:
        super().__init__(f"proxy {proxy} refused {what}: {status} {reason}".rstrip())
        self.status = status


class _Proxied(_Watched):
    """Mixin: a connection through a proxy (``dk_route``, one per pool, says which)."""

    _dk_route: _Route

    def __init__(self, *args: Any, dk_route: _Route, **kwargs: Any) -> None:
        self._dk_route = dk_route
        super().__init__(*args, **kwargs)


class _Forwarding(_Proxied):
    """Mixin: plain http through a forwarding proxy, in absolute form, with its credentials."""

    def request(
        self, method: str, url: str, body: Any = None, headers: Any = None, **kwargs: Any
    ) -> None:
        route = self._dk_route
        extra = route.proxy.headers
        if extra:
            headers = {**(headers or {}), **extra}
        super().request(method, route.origin + url, body=body, headers=headers, **kwargs)

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        response = super().getresponse(*args, **kwargs)  # type: ignore[misc]
        if response.status == PROXY_AUTHENTICATION_REQUIRED:  # only a proxy answers 407
            response.close()
            raise ProxyRefused(
                self._dk_route.proxy, response.status, response.reason, "the request"
            )
        return response


class _Tunneling(_Proxied):
    """Mixin for HTTPS connections: ``CONNECT`` through the proxy, then TLS with the target.

    urllib3 forgets the tunnel when a connection closes, so it is set again on
    every connect; the proxy's credentials go on the ``CONNECT`` only.
    """

    sock: Any

    def connect(self) -> None:
        route = self._dk_route
        proxy = route.proxy
        self.set_tunnel(  # type: ignore[attr-defined]
            route.host, route.port, headers=proxy.headers, scheme=proxy.scheme
        )
        try:
            super().connect()  # type: ignore[misc]
        except OSError as exc:
            refused = _TUNNEL_FAILED.match(str(exc))
            if refused is None or isinstance(exc, ssl.SSLError):
                raise
            what = f"the tunnel to {route.host}:{route.port}"
            raise ProxyRefused(proxy, int(refused[1]), refused[2].strip(), what) from exc
        sock = self.sock
        if not hasattr(sock, "shutdown"):
            # TLS in TLS (an https:// proxy): urllib3's SSLTransport, which the watchdog cannot
            # shut down; shutting the TCP socket under both TLS layers cuts it just as well.
            sock.shutdown = functools.partial(socket.socket.shutdown, sock.socket)


class _ProxiedClasses:
    """The connection classes of proxied pools, bound to a transport's watchdog (no policy)."""

    def __init__(self, watchdog: Watchdog, routes: ProxyRoutes) -> None:
        attributes = {"_watchdog": watchdog, "_policy": None}
        self.forwarding: tuple[type[HTTPConnection], type[HTTPSConnection]] = (
            type("ForwardingHTTPConnection", (_Forwarding, HTTPConnection), attributes),
            type("ForwardingHTTPSConnection", (_Forwarding, HTTPSConnection), attributes),
        )
        self.tunneling: type[HTTPSConnection] = type(
            "TunnelingHTTPSConnection", (_Tunneling, HTTPSConnection), attributes
        )
        self.socks: tuple[type[HTTPConnection], type[HTTPSConnection]] | None = None
        self._socks_version = 0
        if any(proxy.is_socks for proxy in routes.proxies):
            pysocks, contrib = _import_socks()
            self._socks_version = pysocks.PROXY_TYPE_SOCKS5
            self.socks = (
                type("SOCKSHTTPConnection", (_Proxied, contrib.SOCKSConnection), attributes),
                type("SOCKSHTTPSConnection", (_Proxied, contrib.SOCKSHTTPSConnection), attributes),
            )

    def socks_options(self, proxy: Proxy) -> dict[str, Any]:
        """urllib3's ``_socks_options``; ``socks5h`` lets the proxy resolve the name."""
        return {
            "socks_version": self._socks_version,
            "proxy_host": proxy.host,
            "proxy_port": proxy.port,
            "username": proxy.username,
            "password": proxy.password,
            "rdns": proxy.scheme == "socks5h",
        }


def _import_socks() -> tuple[Any, Any]:
    """PySocks and ``urllib3.contrib.socks``, or the :class:`UsageError` naming the extra."""
    try:
        # First: without PySocks, importing urllib3.contrib.socks warns before it fails.
        pysocks = importlib.import_module("socks")
    except ImportError as exc:
        raise UsageError(f"a SOCKS proxy needs PySocks: {SOCKS_EXTRA}") from exc
    return pysocks, importlib.import_module("urllib3.contrib.socks")


def _refuse_http2(request: Request) -> None:
    """Refuse to open HTTPS pools while ``urllib3.http2.inject_into_urllib3()`` is active.

    It makes every urllib3 TLS handshake offer only ``h2``; our connections
    read HTTP/1.1 answers, so a server that accepts would answer in frames
    they cannot read. Better a clear error than a broken call. (Injected before
    this module was imported, it also replaced the ``HTTPSConnection`` we subclass.)
    """
    if "h2" in urllib3.util.ssl_.ALPN_PROTOCOLS or HTTPSConnection.__name__ == "HTTP2Connection":
        raise UsageError(
            "urllib3.http2.inject_into_urllib3() is active, and the built-in transport speaks "
            "HTTP/1.1 only: call urllib3.http2.extract_from_urllib3() first, or send through "
            "a transport plugin that speaks HTTP/2",
            request=request,
        )


def _translate(exc: HTTPError, request: Request) -> NoReturn:
    """Raise the dispatchkit error for a urllib3 error."""
    # NewConnectionError subclasses ConnectTimeoutError: test it first, or a
    # refused port would pass for a timeout.
    if isinstance(exc, NewConnectionError):
        raise ConnectError(f"cannot connect{_via(exc)}: {_reason(exc)}", request=request) from exc
    if isinstance(exc, ConnectTimeoutError):
        raise DispatchTimeout(
            f"connect{_via(exc)} timed out after {request.timeout}s", request=request
        ) from exc
    if isinstance(exc, ReadTimeoutError):
        raise DispatchTimeout(f"read timed out after {request.timeout}s", request=request) from exc
    if isinstance(exc, ClosedPoolError):
        # Its pool was evicted (max_pools) before the request left: safe to retry.
        raise ConnectError("connection pool was closed before use", request=request) from exc
    if isinstance(exc, EmptyPoolError):
        raise DispatchTimeout(
            f"no pooled connection became free within {request.timeout}s", request=request
        ) from exc
    if isinstance(exc, SSLError):
        raise TransportError(
            f"TLS failed: {_reason(exc)}", request=request, transient=False
        ) from exc
    if isinstance(exc, DecodeError):
        # The server's bytes do not decode as they say they are encoded: not worth a retry.
        raise InvalidResponseError(
            f"cannot decode the body: {_reason(exc)}", request=request
        ) from exc
    if isinstance(exc, ProtocolError):
        raise TransportError(f"connection broken: {_reason(exc)}", request=request) from exc
    raise TransportError(f"{type(exc).__name__}: {exc}", request=request) from exc


def _unsendable(
    exc: ValueError, method: str, target: str, headers: Mapping[str, str], request: Request
) -> UsageError:
    """The error for a request http.client refused to write: nothing was sent."""
    try:
        check_headers(headers)
    except UsageError as refused:
        refused.bind(request)
        return refused
    return UsageError(f"cannot send {method} {target[:100]!r}: {exc}", request=request)


def _translate_socket(exc: Exception, request: Request) -> NoReturn:
    """Raise the dispatchkit error for what a socket, ssl or http.client raised."""
    if isinstance(exc, ProxyRefused):
        # Nothing reached the target. A 4xx (credentials, a policy) will not change on a retry.
        raise ConnectError(str(exc), request=request, transient=exc.status >= 500) from exc
    if isinstance(exc, UnaskedSwitch):
        raise TransportError(f"connection broken: {exc}", request=request, transient=False) from exc
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
        raise TransportError(
            f"TLS failed: {type(exc).__name__}: {exc}", request=request, transient=False
        ) from exc
    if isinstance(exc, TimeoutError):
        raise DispatchTimeout(f"read timed out after {request.timeout}s", request=request) from exc
    if isinstance(exc, (OSError, http.client.HTTPException)):
        raise TransportError(
            f"connection broken: {type(exc).__name__}: {exc}", request=request
        ) from exc
    raise TransportError(f"{type(exc).__name__}: {exc}", request=request) from exc


def _via(exc: HTTPError) -> str:
    """`` to the proxy ...`` when ``exc`` came from a proxied connection."""
    conn = getattr(exc, "conn", None) or (exc.args[0] if exc.args else None)
    route = getattr(conn, "_dk_route", None)
    return f" to the proxy {route.proxy}" if isinstance(route, _Route) else ""


def _reason(exc: BaseException) -> str:
    # urllib3 wraps the OSError that says what happened; show that, not the wrapper's repr.
    inner = exc.args[-1] if exc.args and isinstance(exc.args[-1], BaseException) else exc
    return f"{type(inner).__name__}: {inner}"


class Plugin:
    """Gives every Dispatcher one :class:`PoolTransport` for http and https.

    The Dispatcher closes it (``Transport.close``) when it is closed itself.
    """

    name = "transport"

    def __init__(self) -> None:
        self._transport: PoolTransport | None = None
        self._routes: ProxyRoutes | None = None

    @hookimpl(trylast=True)
    def dispatchkit_configure(self, settings: Settings) -> None:
        self._routes = proxy_routes(settings)  # ``proxy``, ``trust_env`` and the environment

    @hookimpl(trylast=True)
    def dispatchkit_transport(self, scheme: str, dispatcher: Dispatcher) -> PoolTransport | None:
        if scheme not in SCHEMES:
            return None
        if self._transport is None:
            self._transport = PoolTransport(dispatcher.settings, self._routes)
        return self._transport
