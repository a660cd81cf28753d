"""Built-in asyncio transport: aiohttp connection pools, for the AsyncDispatcher.

It keeps the sync transport's promises: keep-alive pools per host bounded by
``pool_maxsize``, TLS verified unless ``verify=False``, redirects followed
only as ``follow_redirects`` allows, bodies refused past
``max_response_bytes`` (decoded size) without being held, a total deadline
per attempt, the egress policy checked on the addresses connected to, and
every aiohttp error translated here, once, into the dispatchkit hierarchy.

aiohttp is the optional extra ``dispatchkit[async]``; without it an
AsyncDispatcher cannot be built (a :class:`~dispatchkit.UsageError` says which
extra to install).

Proxies come from the same ``proxy`` / ``trust_env`` settings and environment
as the sync transport (:mod:`dispatchkit.builtin._proxy`), decided once per
origin and handed to aiohttp per request: ``proxy=``, and the credentials in
``proxy_headers`` for a ``CONNECT`` or in the request's own headers for a
forwarded http request (aiohttp's ``proxy_auth`` is deprecated). The session
never reads the environment itself (``trust_env=False``: aiohttp would also
read ``~/.netrc``). SOCKS is refused: aiohttp has none, and the add-on
that brings it (aiohttp-socks) replaces the connector's resolver, where the
egress policy is checked, and proxies a whole connector rather than one
request, so ``NO_PROXY`` would need a second session. On Python 3.10 an
``https://`` proxy serves http URLs only: asyncio has TLS in TLS from 3.11.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import sys
import time
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from dispatchkit._egress import EgressPolicy
from dispatchkit._encoding import SENT_AS_IS
from dispatchkit._models import Request, Response
from dispatchkit._redirects import REDIRECT_STATUSES, SCHEMES, next_hop
from dispatchkit.builtin._proxy import SOCKS_EXTRA, Proxy, ProxyRoutes, proxy_routes
from dispatchkit.builtin.transport import (
    CHUNK,
    DEADLINE_FACTOR,
    PROXY_AUTHENTICATION_REQUIRED,
    body_too_large,
)
from dispatchkit.exceptions import (
    ConnectError,
    DispatchError,
    DispatchTimeout,
    EgressDenied,
    InvalidResponseError,
    TransportError,
    UsageError,
)
from dispatchkit.hookspecs import hookimpl

if TYPE_CHECKING:
    import aiohttp

    from dispatchkit._async_dispatcher import AsyncDispatcher
    from dispatchkit._settings import Settings

SWITCHING_PROTOCOLS = 101
#: Pythons whose asyncio leaves a TLS transport open when its close handshake never
#: completes (fixed in 3.12.8 and 3.13.1): aiohttp's ``enable_cleanup_closed`` is for them.
_TLS_CLOSE_LEAKS = sys.version_info < (3, 12, 8) or (3, 13) <= sys.version_info < (3, 13, 1)
EXTRA = "pip install 'dispatchkit[async]'"
#: How many URLs a transport keeps parsed.
_URLS_KEPT = 256


def import_aiohttp() -> Any:
    """aiohttp, or the :class:`UsageError` that says how to install it."""
    try:
        import aiohttp
    except ImportError as exc:
        raise UsageError(f"the AsyncDispatcher needs aiohttp: {EXTRA}") from exc
    return aiohttp


class AiohttpTransport:
    """Sends requests over an aiohttp session made in the event loop that first uses it."""

    def __init__(
        self, settings: Settings, routes: ProxyRoutes | None = None, *, pool_waits: bool = False
    ) -> None:
        self._aiohttp = import_aiohttp()
        self._routes = routes
        # Time the waits for a connection of a full pool (Attempt.pool_wait): only when asked,
        # since an aiohttp trace costs every request something.
        self._pool_waits = pool_waits
        # origin (scheme, host, port) -> its proxy, or None to go direct.
        self._proxies: dict[tuple[str, str | None, int | None], _Via | None] = {}
        if routes is not None:
            _check_routes(routes)
        self._settings = settings
        self._limit = settings.max_response_bytes
        self._follow = settings.follow_redirects
        self._deadline = settings.deadline
        self._policy = EgressPolicy(settings.egress_allow) if settings.egress == "public" else None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checked_hosts: set[str] = set()
        # url -> the yarl URL sent for it: many calls go to one URL (a webhook's POSTs, a
        # map's equal arguments), and making one costs more than the rest of send().
        self._urls: dict[str, Any] = {}
        # No egress policy, no proxy, no redirect to follow: send() takes its short path.
        self._direct = routes is None and self._policy is None and self._follow == 0

    # -- the session ----------------------------------------------------------------------

    def _session_here(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is not None and self._loop is loop:
            return self._session
        if self._session is not None:
            raise UsageError("an AsyncDispatcher is bound to the event loop that first used it")
        lib = self._aiohttp
        settings = self._settings
        # The proxies' own names: the operator chose them, so the egress policy lets them resolve.
        trusted = frozenset(() if self._routes is None else (p.host for p in self._routes.proxies))
        connector = lib.TCPConnector(
            limit=0,  # no bound over all hosts; per host, like the sync pools:
            limit_per_host=settings.pool_maxsize,
            ssl=_ssl_context(settings),
            force_close=not settings.keep_alive,
            resolver=None if self._policy is None else _EgressResolver(lib, self._policy, trusted),
            ttl_dns_cache=10,
            # A TLS connection cut mid-answer (a deadline, a cancelled call) is closed
            # with a TLS shutdown the peer may never answer; before asyncio's fix it then
            # stayed open until the loop closed. aiohttp aborts such connections 2 s
            # later, and on close, when asked to (and warns when asked on a fixed Python).
            enable_cleanup_closed=_TLS_CLOSE_LEAKS,
        )
        session: aiohttp.ClientSession = lib.ClientSession(
            connector=connector,
            # What the sync transport sends (http.client asks for identity), nothing more
            # (aiohttp adds Accept and its own codings otherwise); no cookies are kept.
            headers={"Accept-Encoding": "identity"},
            skip_auto_headers=("Accept", "User-Agent"),
            cookie_jar=lib.DummyCookieJar(),
            auto_decompress=True,
            trust_env=False,  # proxies are ours to choose (and ~/.netrc is not read)
            trace_configs=[_pool_wait_trace(lib)] if self._pool_waits else None,
        )
        self._session, self._loop = session, loop
        return session

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            total = self._deadline or DEADLINE_FACTOR * seconds
            # No ``connect`` timeout: it arms a timer on every request, pooled or not. Waiting
            # for a free pooled connection is bounded by the attempt's total deadline.
            timeout = self._aiohttp.ClientTimeout(
                total=total, sock_connect=seconds, sock_read=seconds
            )
            if len(self._timeouts) < 64:
                self._timeouts[seconds] = timeout
        return timeout

    # -- one attempt ------------------------------------------------------------------------

    async def send(self, request: Request) -> Response:
        session = self._session
        if session is None or self._loop is not asyncio.get_running_loop():
            session = self._session_here()  # made now, or the UsageError of another loop
        timeout = self._timeouts.get(request.timeout) or self._timeout(request.timeout)
        if self._direct:
            # One request to the URL as it is: the loop below with one hop and no proxy or
            # policy, without their bookkeeping (tests/test_async_fast_paths.py).
            try:
                async with session.request(
                    request.method,
                    self._url(request.url),
                    data=request.body,
                    headers=request.headers,
                    allow_redirects=False,
                    timeout=timeout,
                    trace_request_ctx=request,
                ) as answer:
                    status, answer_headers = answer.status, answer.headers
                    if status == SWITCHING_PROTOCOLS:
                        answer.close()  # the connection speaks something else now: dropped
                        raise _switched(request)
                    length = answer.content_length
                    if (
                        length is not None
                        and length <= self._limit
                        and "Content-Encoding" not in answer_headers
                    ):
                        data: bytes = await answer.read()  # the common case, inline
                    else:
                        data = await self._read(answer, request)
                    return Response(status, answer_headers, data)
            except DispatchError:
                raise
            except Exception as exc:
                _translate(self._aiohttp, exc, request, timeout.total)
        url, method, body = request.url, request.method, request.body
        headers: Any = request.headers
        via: _Via | None = None
        try:
            for hop in range(self._follow + 1):
                target = self._url(url)
                if self._policy is not None:
                    self._check_literal(target.host or "", request)
                sent, proxy_url, proxy_headers = headers, None, None
                if self._routes is not None:
                    via = self._via(target)
                    if via is not None:
                        proxy_url = via.url
                        if target.scheme == "https":
                            proxy_headers = via.proxy.headers  # on the CONNECT only
                        elif via.proxy.username is not None:
                            # A forwarding proxy reads the request itself (aiohttp would not
                            # send proxy_headers here, and its proxy_auth is deprecated).
                            sent = {**headers, **via.proxy.headers}
                async with session.request(
                    method,
                    target,
                    data=body,
                    headers=sent,
                    allow_redirects=False,
                    timeout=timeout,
                    proxy=proxy_url,
                    proxy_headers=proxy_headers,
                    trace_request_ctx=request,  # for _pool_wait_trace, when there is one
                ) as answer:
                    status, answer_headers = answer.status, answer.headers
                    if status == PROXY_AUTHENTICATION_REQUIRED and via is not None:
                        # A forwarding proxy's own answer (only a proxy sends 407).
                        raise ConnectError(
                            f"proxy {via.proxy} refused the request: {status} {answer.reason}",
                            request=request,
                            transient=False,
                        )
                    if status == SWITCHING_PROTOCOLS:
                        answer.close()  # the connection speaks something else now: dropped
                        raise _switched(request)
                    if status in REDIRECT_STATUSES and hop < self._follow:
                        location = answer_headers.get("Location")
                        if location:
                            await self._read(answer, request)  # drained: the connection is reused
                            url, method, body, headers = next_hop(
                                url, location, status, method, body, headers
                            )
                            continue
                    length = answer.content_length
                    if (
                        length is not None
                        and length <= self._limit
                        and "Content-Encoding" not in answer_headers
                    ):
                        data = await answer.read()  # the common case, inline
                    else:
                        data = await self._read(answer, request)
                    return Response(status, answer_headers, data)
        except DispatchError:
            raise
        except Exception as exc:
            if via is not None:
                _translate_proxy(self._aiohttp, exc, request, via.proxy, target)
            _translate(self._aiohttp, exc, request, timeout.total)
        raise AssertionError("unreachable: the last hop returns")  # pragma: no cover

    def _via(self, target: Any) -> _Via | None:
        """The proxy for ``target``'s origin, decided once per origin."""
        key = (target.scheme, target.host, target.port)
        try:
            return self._proxies[key]
        except KeyError:
            pass
        assert self._routes is not None
        proxy = self._routes.route(target.scheme, target.host or "", target.port)
        via = None if proxy is None else _Via(proxy, self._aiohttp.client.URL(proxy.url))
        if len(self._proxies) < 1024:
            self._proxies[key] = via
        return via

    def _url(self, url: str) -> Any:
        # A URL made only of RFC 3986 characters goes out exactly as written (as the sync
        # transport sends it, and as the signing plugin signed it); yarl encodes the rest.
        target = self._urls.get(url)
        if target is None:
            encoded = bool(SENT_AS_IS.fullmatch(url.partition("://")[2]))
            target = self._aiohttp.client.URL(url, encoded=encoded)
            if len(self._urls) >= _URLS_KEPT:
                self._urls.clear()  # many URLs, each seldom again: start over
            self._urls[url] = target  # a yarl URL is immutable: shared safely
        return target

    def _check_literal(self, host: str, request: Request) -> None:
        """aiohttp skips the resolver for an IP address: check a literal host here."""
        if host in self._checked_hosts:
            return
        assert self._policy is not None
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return  # a name: the resolver checks what it resolves to
        if not (self._policy.permits(ip) or self._policy.host_allowed(host)):
            raise EgressDenied(
                f"egress policy refuses {host}: not a public address", request=request
            )
        if len(self._checked_hosts) < 1024:
            self._checked_hosts.add(host)

    async def _read(self, answer: aiohttp.ClientResponse, request: Request) -> bytes:
        limit = self._limit
        coding = answer.headers.get("Content-Encoding", "")
        if "," in coding:
            # aiohttp decodes one coding and passes a chain through still encoded.
            raise InvalidResponseError(
                f"cannot decode the body: Content-Encoding {coding[:100]!r} is a chain of "
                "codings, which the asyncio transport does not decode",
                status=answer.status,
                request=request,
            )
        length = answer.content_length
        if length is not None and length > limit:
            raise body_too_large(limit, answer.status, request, length)
        if length is not None and "Content-Encoding" not in answer.headers:
            data: bytes = await answer.read()
            return data
        chunks: list[bytes] = []
        size = 0
        async for chunk in answer.content.iter_chunked(CHUNK):  # decoded bytes
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit, answer.status, request)
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        session = self._session
        if session is None:
            return
        if self._loop is not asyncio.get_running_loop():
            raise UsageError("close an AsyncDispatcher in the event loop that used it")
        self._session = None
        await session.close()


class _Via(NamedTuple):
    """An origin's proxy, and its URL (no credentials) as aiohttp takes it."""

    proxy: Proxy
    url: Any


def _pool_wait_trace(aiohttp: Any) -> Any:
    """An aiohttp ``TraceConfig`` that adds each wait for a connection of a full pool
    (``limit_per_host``) to the recorded attempt's ``pool_wait``.

    aiohttp signals the wait's end only when a connection came: a wait the
    attempt's deadline cut short is not counted.
    """
    config = aiohttp.TraceConfig()

    async def queued(session: Any, context: Any, params: Any) -> None:
        context.dk_queued = time.perf_counter()

    async def dequeued(session: Any, context: Any, params: Any) -> None:
        request = context.trace_request_ctx
        if isinstance(request, Request) and request._began is not None:
            request._pool_wait += time.perf_counter() - context.dk_queued

    config.on_connection_queued_start.append(queued)
    config.on_connection_queued_end.append(dequeued)
    return config


def _check_routes(routes: ProxyRoutes) -> None:
    """Refuse the proxies aiohttp cannot use, while the AsyncDispatcher is built."""
    for proxy in routes.proxies:
        if proxy.is_socks:
            raise UsageError(
                f"the asyncio transport cannot use the SOCKS proxy {proxy}: aiohttp has no "
                "SOCKS support. Use an http:// proxy, or the sync Dispatcher with SOCKS "
                f"({SOCKS_EXTRA}); a proxy from the environment is ignored with trust_env=False"
            )
    if sys.version_info < (3, 11) and routes.https is not None and routes.https.scheme == "https":
        raise UsageError(
            f"the asyncio transport cannot reach https URLs through the https:// proxy "
            f"{routes.https} on Python 3.10 (asyncio has TLS in TLS from 3.11): use an http:// "
            "proxy, whose CONNECT tunnel carries TLS end to end with the target"
        )


class _EgressResolver:
    """aiohttp's resolver, keeping only the addresses the egress policy allows."""

    def __init__(self, aiohttp: Any, policy: EgressPolicy, trusted: frozenset[str]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._policy = policy
        self._trusted = trusted

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[dict[str, Any]]:
        infos: list[dict[str, Any]] = await self._inner.resolve(host, port, family)
        if host in self._trusted or self._policy.host_allowed(host):
            return infos
        allowed = [i for i in infos if self._policy.permits(ipaddress.ip_address(i["host"]))]
        if not allowed:
            shown = ", ".join(sorted({str(i["host"]) for i in infos}))
            raise EgressDenied(f"egress policy refuses {host} ({shown}): not a public address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _ssl_context(settings: Settings) -> ssl.SSLContext | bool:
    if not settings.verify:
        return False
    context = ssl.create_default_context(cafile=settings.ca_certs)
    if settings.client_cert is not None:
        context.load_cert_chain(settings.client_cert, settings.client_key)
    return context


def _switched(request: Request) -> TransportError:
    return TransportError(
        "connection broken: 101 Switching Protocols without an Upgrade request",
        request=request,
        transient=False,
    )


def _translate(aiohttp: Any, exc: Exception, request: Request, total: float | None) -> NoReturn:
    """Raise the dispatchkit error for what aiohttp (or asyncio) raised."""
    errors = aiohttp.client_exceptions
    if isinstance(exc, errors.ConnectionTimeoutError):
        raise DispatchTimeout(
            f"connect timed out after {request.timeout}s", request=request
        ) from exc
    if isinstance(exc, errors.ServerTimeoutError):
        raise DispatchTimeout(f"read timed out after {request.timeout}s", request=request) from exc
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        raise DispatchTimeout(
            f"attempt ran past its total deadline of {total:g}s", request=request
        ) from exc
    if isinstance(exc, errors.ClientSSLError | errors.ServerFingerprintMismatch):
        raise TransportError(f"TLS failed: {exc}", request=request, transient=False) from exc
    if isinstance(exc, errors.ClientConnectorError | errors.ClientConnectorDNSError):
        raise ConnectError(f"cannot connect: {exc}", request=request) from exc
    if isinstance(exc, errors.ClientPayloadError) and _is_decoding(exc):
        raise InvalidResponseError(f"cannot decode the body: {exc}", request=request) from exc
    if isinstance(exc, errors.InvalidURL):
        raise UsageError(f"invalid URL: {exc}", request=request) from exc
    if isinstance(exc, errors.ClientError | OSError):
        raise TransportError(
            f"connection broken: {type(exc).__name__}: {exc}", request=request
        ) from exc
    if isinstance(exc, ValueError):  # a header or method aiohttp will not send
        raise UsageError(f"cannot send the request: {exc}", request=request) from exc
    raise TransportError(f"{type(exc).__name__}: {exc}", request=request) from exc


def _translate_proxy(
    aiohttp: Any, exc: Exception, request: Request, proxy: Proxy, target: Any
) -> None:
    """Raise the dispatchkit error for a failure of the proxy itself; else return."""
    errors = aiohttp.client_exceptions
    if isinstance(exc, errors.ClientProxyConnectionError):
        raise ConnectError(
            f"cannot connect to the proxy {proxy}: {type(exc.os_error).__name__}: {exc.os_error}",
            request=request,
        ) from exc
    if isinstance(exc, errors.ClientHttpProxyError):
        # The CONNECT was refused: nothing reached the target. A 4xx will not change on a retry.
        raise ConnectError(
            f"proxy {proxy} refused the tunnel to {target.host}:{target.port}: "
            f"{exc.status} {exc.message}",
            request=request,
            transient=exc.status >= 500,
        ) from exc


def _is_decoding(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "decod" in text or "compress" in text or "content-encoding" in text


class Plugin:
    """Gives every AsyncDispatcher one :class:`AiohttpTransport` for http and https."""

    name = "async_transport"

    def __init__(self) -> None:
        self._transport: AiohttpTransport | None = None
        self._routes: ProxyRoutes | None = None

    @hookimpl(trylast=True)
    def dispatchkit_configure(self, settings: Settings) -> None:
        self._routes = proxy_routes(settings)

    @hookimpl(trylast=True)
    def dispatchkit_async_transport(
        self, scheme: str, dispatcher: AsyncDispatcher
    ) -> AiohttpTransport | None:
        if scheme not in SCHEMES:
            return None
        if self._transport is None:
            # Pool waits are timed only for a dispatcher whose attempts a hook records.
            records = any("dispatchkit_attempt_done" in info.hooks for info in dispatcher.plugins)
            self._transport = AiohttpTransport(
                dispatcher.settings, self._routes, pool_waits=records
            )
        return self._transport
