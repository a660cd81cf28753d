"""The clients under test: each makes the same GET of the same URL and parses the envelope.

Every client returns the envelope's ``retval`` (100), decoded with
``orjson.loads`` so that only the HTTP stacks differ, and is made with a 10 s
timeout and, for HTTPS, the benchmark's CA. Peers that are not installed are
left out (``missing()`` names them). Sequential clients are ``call()``
closures; concurrent ones run a batch of ``n`` calls with ``threads`` calls in
flight: on that many threads, or for the asyncio clients on one event loop of
their own (``Batch.run`` drives it, bounded by :func:`sample_limit`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import selectors
import socket
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import urlsplit

import orjson

TIMEOUT = 10.0
TASK = "/multiply"
KWARGS: dict[str, Any] = {"x": 10, "y": 10}
QUERY = "x=10&y=10"
RETVAL = 100
#: The delayed endpoint's delay, and its path on the target (benchmarks/target.py).
DELAY_MS = 50


def delayed(ms: int = DELAY_MS) -> str:
    """The task's path on the target when it answers ``ms`` milliseconds late."""
    return f"/delay/{ms}{TASK}"


@dataclass(frozen=True)
class Endpoint:
    """Where the target answers: ``base`` is ``scheme://host:port``; ``ca`` verifies HTTPS.

    ``path`` is the task's path: :data:`TASK` answers at once, :func:`delayed` late.
    """

    base: str
    ca: str | None = None
    path: str = TASK

    @property
    def scheme(self) -> str:
        return self.base.partition(":")[0]

    @property
    def host(self) -> str:
        return urlsplit(self.base).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.base).port or (443 if self.scheme == "https" else 80)

    @property
    def netloc(self) -> str:
        return urlsplit(self.base).netloc

    @property
    def task(self) -> str:
        """The task's URL without arguments (what dispatchkit is given, with ``KWARGS``)."""
        return self.base + self.path

    @property
    def url(self) -> str:
        """The task's URL with its arguments: the same bytes dispatchkit sends."""
        return f"{self.base}{self.path}?{QUERY}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.scheme != "https":
            return None
        return ssl.create_default_context(cafile=self.ca)


class RawSocket:
    """The floor: hand-written HTTP/1.1 over one keep-alive socket, Content-Length framing."""

    def __init__(self, endpoint: Endpoint, target: str | None = None) -> None:
        target = target or f"{endpoint.path}?{QUERY}"
        self.request = f"GET {target} HTTP/1.1\r\nHost: {endpoint.netloc}\r\n\r\n".encode()
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = endpoint.ssl_context()
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=endpoint.host)
        self.sock = sock
        self.buffer = b""

    def _response(self) -> bytes:
        buffer = self.buffer
        recv = self.sock.recv
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            chunk = recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buffer += chunk
        head = buffer[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        if not head.startswith(b"http/1.1 200") or at < 0:
            raise ConnectionError(f"unexpected response head {head[:200]!r}")
        stop = head.find(b"\r\n", at + 2)
        start = end + 4
        need = start + int(head[at + 17 : stop if stop >= 0 else None])
        while len(buffer) < need:
            chunk = recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buffer += chunk
        self.buffer = buffer[need:]
        return buffer[start:need]

    def fetch(self) -> bytes:
        """Send the request, return the response body."""
        self.sock.sendall(self.request)
        return self._response()

    def __call__(self) -> Any:
        return orjson.loads(self.fetch())["retval"]

    def close(self) -> None:
        self.sock.close()


def load(endpoint: Endpoint, connections: int, seconds: float) -> float:
    """Server capacity: requests/s over ``connections`` raw sockets, one request in flight each.

    One thread multiplexes every socket (the client does next to nothing per
    request, unlike the clients under test), so this is what the server can
    answer at that concurrency, not what a Python HTTP stack can ask.
    """
    request = f"GET {endpoint.path}?{QUERY} HTTP/1.1\r\nHost: {endpoint.netloc}\r\n\r\n".encode()
    socks = [RawSocket(endpoint) for _ in range(connections)]
    answered = 0
    with selectors.DefaultSelector() as selector:
        try:
            for raw in socks:
                raw.sock.setblocking(False)
                selector.register(raw.sock, selectors.EVENT_READ)
                raw.sock.send(request)
            started = time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds:
                for key, _ in selector.select(TIMEOUT):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(65536)
                    except ssl.SSLWantReadError:
                        continue
                    # The answer is one small segment: count the answers it holds and ask again.
                    done = data.count(b"HTTP/1.1 200")
                    answered += done
                    if done:
                        sock.send(request * done)
        finally:
            for raw in socks:
                raw.close()
    return answered / elapsed


@dataclass
class Client:
    """A made client: ``call()`` does one call (returns the retval), ``close()`` frees it."""

    call: Callable[[], Any]
    close: Callable[[], None]


@dataclass
class Batch:
    """A made concurrent client: ``run(n)`` does ``n`` calls on its threads, returns retvals."""

    run: Callable[[int], list[Any]]
    close: Callable[[], None]


@dataclass(frozen=True)
class Spec:
    key: str
    label: str
    requires: str  # the module it needs
    make: Callable[..., Any]  # (Endpoint) -> Client, or (Endpoint, threads) -> Batch
    short: str = ""  # a column title
    max_level: int | None = None  # concurrent: the most calls in flight it is run with


def entry_point_plugins() -> list[str]:
    """The plugins installed through entry points, which the suite leaves out."""
    return sorted({ep.name for ep in entry_points(group="dispatchkit")})


def dispatcher(endpoint: Endpoint, plugins: Sequence[object] = (), **settings: Any) -> Any:
    """A Dispatcher with the built-in plugins only, plus ``plugins`` when given.

    Entry-point plugins are disabled by name (the effect of
    ``DISPATCHKIT_DISABLE_PLUGIN_AUTOLOAD=1``, without changing the environment).
    """
    from dispatchkit import Dispatcher

    given = {getattr(p, "name", "") for p in plugins}
    disable = [name for name in entry_point_plugins() if name not in given]
    return Dispatcher(
        timeout=TIMEOUT, ca_certs=endpoint.ca, plugins=plugins, disable=disable, **settings
    )


# -- sequential clients ------------------------------------------------------------


def _raw(ep: Endpoint) -> Client:
    raw = RawSocket(ep)
    return Client(raw, raw.close)


def _urllib3_pooled(ep: Endpoint) -> Client:
    import urllib3

    pm = urllib3.PoolManager(ca_certs=ep.ca, timeout=TIMEOUT)
    url = ep.url
    return Client(lambda: orjson.loads(pm.request("GET", url).data)["retval"], pm.clear)


def _urllib3_unpooled(ep: Endpoint) -> Client:
    import urllib3

    pm = urllib3.PoolManager(ca_certs=ep.ca, timeout=TIMEOUT)
    url, headers = ep.url, {"Connection": "close"}
    return Client(
        lambda: orjson.loads(pm.request("GET", url, headers=headers).data)["retval"], pm.clear
    )


def _requests_session(ep: Endpoint) -> Client:
    import requests

    # verify per request: REQUESTS_CA_BUNDLE in the environment would override Session.verify.
    session = requests.Session()
    url, verify = ep.url, ep.ca or True
    return Client(
        lambda: orjson.loads(session.get(url, timeout=TIMEOUT, verify=verify).content)["retval"],
        session.close,
    )


def _requests_get(ep: Endpoint) -> Client:
    import requests

    url, verify = ep.url, ep.ca or True
    return Client(
        lambda: orjson.loads(requests.get(url, timeout=TIMEOUT, verify=verify).content)["retval"],
        lambda: None,
    )


def _httpx_client(ep: Endpoint) -> Client:
    import httpx

    client = httpx.Client(verify=ep.ssl_context() or True, timeout=TIMEOUT)
    url = ep.url
    return Client(lambda: orjson.loads(client.get(url).content)["retval"], client.close)


def _httpx_get(ep: Endpoint) -> Client:
    import httpx

    # One SSLContext for all calls, as httpx's docs advise; each call still opens a connection.
    url, verify = ep.url, ep.ssl_context() or True
    return Client(
        lambda: orjson.loads(httpx.get(url, verify=verify, timeout=TIMEOUT).content)["retval"],
        lambda: None,
    )


def _urlopen(ep: Endpoint) -> Client:
    url, context = ep.url, ep.ssl_context()

    def call() -> Any:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as response:
            return orjson.loads(response.read())["retval"]

    return Client(call, lambda: None)


def _dk(ep: Endpoint, **settings: Any) -> Client:
    d = dispatcher(ep, **settings)
    task, kwargs = ep.task, KWARGS
    return Client(lambda: d.call(task, "GET", **kwargs), d.close)


def _dk_pooled(ep: Endpoint) -> Client:
    return _dk(ep)


def _dk_unpooled(ep: Endpoint) -> Client:
    return _dk(ep, keep_alive=False)


def _dk_hooks(ep: Endpoint) -> Client:
    from dispatchkit_example import ExamplePlugin

    return _dk(ep, plugins=[ExamplePlugin])


SEQUENTIAL: dict[str, Spec] = {
    s.key: s
    for s in (
        Spec("raw", "raw socket, keep-alive (the floor)", "orjson", _raw),
        Spec("urllib3", "urllib3 PoolManager, pooled", "urllib3", _urllib3_pooled),
        Spec("dk", "dispatchkit Dispatcher.call, pooled", "dispatchkit", _dk_pooled),
        Spec(
            "dk_hooks", "dispatchkit + example plugin's 2 hooks", "dispatchkit_example", _dk_hooks
        ),
        Spec("httpx", "httpx.Client", "httpx", _httpx_client),
        Spec("requests", "requests.Session", "requests", _requests_session),
        Spec("urlopen", "urllib.request.urlopen per call", "urllib", _urlopen),
        Spec("urllib3_new", "urllib3, new connection per call", "urllib3", _urllib3_unpooled),
        Spec("dk_new", "dispatchkit keep_alive=False", "dispatchkit", _dk_unpooled),
        Spec("httpx_get", "httpx.get, no Client", "httpx", _httpx_get),
        Spec("requests_get", "requests.get, no Session", "requests", _requests_get),
    )
}


# -- concurrent clients ------------------------------------------------------------


def _dk_map(ep: Endpoint, threads: int) -> Batch:
    # pool_maxsize sizes the executor (one thread per pooled connection) and map's window.
    d = dispatcher(ep, pool_maxsize=threads)
    task = ep.task
    return Batch(lambda n: d.map(task, itertools.repeat(KWARGS, n)), d.close)


def _dk_submit(ep: Endpoint, threads: int) -> Batch:
    d = dispatcher(ep, pool_maxsize=threads)
    task = ep.task

    def run(n: int) -> list[Any]:
        results = [d.submit(task, "GET", **KWARGS) for _ in range(n)]
        return [r.get(timeout=TIMEOUT * 3) for r in results]

    return Batch(run, d.close)


def _threaded(call: Callable[[], Any], threads: int, close: Callable[[], None]) -> Batch:
    executor = ThreadPoolExecutor(threads)

    def run(n: int) -> list[Any]:
        return list(executor.map(lambda _: call(), range(n), timeout=TIMEOUT * 3 + n / 100))

    def close_all() -> None:
        executor.shutdown(wait=True)
        close()

    return Batch(run, close_all)


def _urllib3_threads(ep: Endpoint, threads: int) -> Batch:
    import urllib3

    pm = urllib3.PoolManager(maxsize=threads, block=True, ca_certs=ep.ca, timeout=TIMEOUT)
    url = ep.url
    return _threaded(lambda: orjson.loads(pm.request("GET", url).data)["retval"], threads, pm.clear)


def _requests_threads(ep: Endpoint, threads: int) -> Batch:
    import requests

    # The default adapter, as users share a Session: pool_maxsize=10, pool_block=False.
    session = requests.Session()
    url, verify = ep.url, ep.ca or True
    return _threaded(
        lambda: orjson.loads(session.get(url, timeout=TIMEOUT, verify=verify).content)["retval"],
        threads,
        session.close,
    )


# -- asyncio clients: N calls in flight on one event loop --------------------------------

#: The session the AsyncDispatcher's aiohttp transport makes
#: (src/dispatchkit/builtin/async_transport.py), which the hand-written client copies: the
#: headers aiohttp would add that it leaves out, the ones it sends on every request, and
#: its timeouts (no ``connect`` timeout: it arms a timer on every request).
SKIP_AUTO_HEADERS = ("Accept", "User-Agent")
SESSION_HEADERS = {"Accept-Encoding": "identity"}
#: Every asyncio client is closed within this many seconds, whatever state it is in.
CLOSE_LIMIT = 15.0

AsyncRun = Callable[[int], Awaitable[list[Any]]]
#: What an asyncio client's ``make()`` returns on its loop: ``run(n)`` and ``aclose()``.
AsyncMade = tuple[AsyncRun, Callable[[], Awaitable[None]]]


def sample_limit(n: int) -> float:
    """The longest ``n`` concurrent calls may take (unless told) before they are given up."""
    return TIMEOUT * 3 + n / 100


class BatchTimeout(TimeoutError):
    """A concurrent sample that did not finish within its limit."""


def _on_loop(make: Callable[[], Awaitable[AsyncMade]], limit: float | None = None) -> Batch:
    """A Batch driving an asyncio client on an event loop of its own.

    ``make()`` runs on the loop (aiohttp wants its session made there) and
    returns ``(run, aclose)``. Every ``run(n)`` is bounded by ``limit``
    seconds, :func:`sample_limit` when not given (cancelled past it: a client
    that collapses is reported, never waited for), and closing by
    :data:`CLOSE_LIMIT`.
    """
    loop = asyncio.new_event_loop()
    try:
        run_n, aclose = loop.run_until_complete(asyncio.wait_for(make(), CLOSE_LIMIT))
    except BaseException:
        loop.close()
        raise

    def run(n: int) -> list[Any]:
        bound = sample_limit(n) if limit is None else limit
        try:
            return loop.run_until_complete(asyncio.wait_for(run_n(n), bound))
        except asyncio.TimeoutError:
            raise BatchTimeout(f"{n:,} calls did not finish within {bound:g} s") from None

    def close() -> None:
        try:
            loop.run_until_complete(asyncio.wait_for(aclose(), CLOSE_LIMIT))
        except asyncio.TimeoutError:
            pass  # reported by nobody: the sample already failed; the loop goes anyway
        finally:
            loop.close()

    return Batch(run, close)


def _gathered(one: Callable[[], Awaitable[Any]], in_flight: int) -> AsyncRun:
    """``n`` calls of ``one`` at most ``in_flight`` at a time: a Semaphore and ``gather``."""
    slots = asyncio.Semaphore(in_flight)

    async def bounded() -> Any:
        async with slots:
            return await one()

    async def run(n: int) -> list[Any]:
        return list(await asyncio.gather(*(bounded() for _ in range(n))))

    return run


class EnvelopeError(Exception):
    """An answer a hand-written client would not accept: not a 200 or not a success."""


def _aiohttp(ep: Endpoint, in_flight: int, limit: float | None = None) -> Batch:
    import aiohttp

    url = ep.url

    async def make() -> AsyncMade:
        # The pool and the session the AsyncDispatcher's transport makes for pool_maxsize=N,
        # and the same timeouts: what a careful hand-written client would use.
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=in_flight, ssl=ep.ssl_context() or True
        )
        session = aiohttp.ClientSession(
            connector=connector,
            headers=SESSION_HEADERS,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=TIMEOUT * 6, sock_connect=TIMEOUT, sock_read=TIMEOUT
            ),
        )

        async def one() -> Any:
            async with session.get(url) as response:
                body = await response.read()
                status = response.status
            if status != 200:
                raise EnvelopeError(f"HTTP {status}")
            envelope = orjson.loads(body)
            if envelope.get("status") != "success":
                raise EnvelopeError(f"envelope {envelope!r:.200}")
            return envelope["retval"]

        return _gathered(one, in_flight), session.close

    return _on_loop(make, limit)


def _httpx_async(ep: Endpoint, in_flight: int, limit: float | None = None) -> Batch:
    import httpx

    url = ep.url

    async def make() -> AsyncMade:
        client = httpx.AsyncClient(
            verify=ep.ssl_context() or True,
            timeout=TIMEOUT,  # connect, read, write and waiting for a pooled connection
            limits=httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight),
        )

        async def one() -> Any:
            response = await client.get(url)
            if response.status_code != 200:
                raise EnvelopeError(f"HTTP {response.status_code}")
            envelope = orjson.loads(response.content)
            if envelope.get("status") != "success":
                raise EnvelopeError(f"envelope {envelope!r:.200}")
            return envelope["retval"]

        return _gathered(one, in_flight), client.aclose

    return _on_loop(make, limit)


def async_dispatcher(endpoint: Endpoint, **settings: Any) -> Any:
    """An AsyncDispatcher with the built-in plugins only (as :func:`dispatcher`)."""
    from dispatchkit import AsyncDispatcher

    return AsyncDispatcher(
        timeout=TIMEOUT, ca_certs=endpoint.ca, disable=entry_point_plugins(), **settings
    )


def _dk_async(ep: Endpoint, in_flight: int, limit: float | None = None) -> Batch:
    task = ep.task

    async def make() -> AsyncMade:
        d = async_dispatcher(ep, pool_maxsize=in_flight)

        async def run(n: int) -> list[Any]:
            values: list[Any] = await d.map(
                task, itertools.repeat(KWARGS, n), "GET", concurrency=in_flight
            )
            return values

        return run, d.aclose

    return _on_loop(make, limit)


#: The concurrent clients driven by asyncio (the rest run on threads).
ASYNCIO = ("aiohttp", "httpx_async", "dk_async")

CONCURRENT: dict[str, Spec] = {
    s.key: s
    for s in (
        Spec("urllib3", "urllib3 PoolManager(maxsize=N, block=True) + N threads", "urllib3",
             _urllib3_threads, "urllib3"),
        Spec("dk_map", "dispatchkit Dispatcher.map (pool_maxsize=N)", "dispatchkit", _dk_map,
             "dk map"),
        Spec("dk_submit", "dispatchkit submit all, then get", "dispatchkit", _dk_submit,
             "dk submit"),
        # Its default adapter keeps 10 connections: past 64 threads it would open (and
        # throw away) a connection for most calls, which says nothing new.
        Spec("requests", "requests.Session shared (default pool 10)", "requests",
             _requests_threads, "requests.Session", max_level=64),
        Spec("aiohttp", "aiohttp + orjson, hand-written (Semaphore(N) + gather)", "aiohttp",
             _aiohttp, "aiohttp"),
        Spec("dk_async", "dispatchkit AsyncDispatcher.map (pool_maxsize=N, concurrency=N)",
             "aiohttp", _dk_async, "dk async"),
        # Last: its collapse (a sample cut at sample_limit_s) then delays both aiohttp-based
        # clients alike, whose idle pooled connections expire after aiohttp's 15 s keep-alive.
        Spec("httpx_async", "httpx.AsyncClient (max_connections=N, Semaphore(N) + gather)",
             "httpx", _httpx_async, "httpx async"),
    )
}  # fmt: skip


def missing(specs: dict[str, Spec]) -> dict[str, str]:
    """Clients whose library is not installed here: key -> module."""
    return {
        key: spec.requires
        for key, spec in specs.items()
        if importlib.util.find_spec(spec.requires) is None
    }


def plugins_on() -> list[str]:
    """The plugins the suite's Dispatchers run with."""
    d = dispatcher(Endpoint("http://127.0.0.1:1"))
    try:
        return [info.name for info in d.plugins]
    finally:
        d.close()
