"""Proxies for the built-in transports: the ``proxy`` and ``trust_env`` settings.

``proxy="http://user:pass@host:3128"`` sends every call through that proxy
(``https://`` reaches the proxy over TLS; ``socks5://`` and ``socks5h://``
need the ``dispatchkit[socks]`` extra, sync Dispatcher only). Without it, and
unless ``trust_env=False``, the environment decides, as with requests and
httpx: ``HTTP_PROXY`` for http URLs, ``HTTPS_PROXY`` for https URLs,
``ALL_PROXY`` for either when its own is unset, and ``NO_PROXY`` names the
hosts reached directly (see :class:`NoProxy`). Each variable may be written in
lower case, which wins over upper case (read by
:func:`urllib.request.getproxies_environment`: an empty lower-case variable
unsets its upper-case twin, and ``HTTP_PROXY`` is ignored when
``REQUEST_METHOD`` says the process is a CGI script). An explicit ``proxy``
replaces the environment entirely, ``NO_PROXY`` included.

Everything is read once, when the Dispatcher is built; a transport asks
:meth:`ProxyRoutes.route` once per origin, when it opens that origin's pool.
With no proxy anywhere there are no routes, and the transports run exactly as
they do without this module.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from dispatchkit._redact import MASK, mask_url
from dispatchkit.exceptions import UsageError

if TYPE_CHECKING:
    from dispatchkit._settings import Settings

#: Proxy schemes, and the port each means when the URL gives none.
PROXY_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}
SOCKS_SCHEMES = frozenset({"socks5", "socks5h"})
TARGET_PORTS = {"http": 80, "https": 443}
SOCKS_EXTRA = "pip install 'dispatchkit[socks]'"
_FROM_ENV = " (environment; trust_env=False ignores it)"
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


@dataclass(frozen=True, repr=False)
class Proxy:
    """One proxy: where it is, and the credentials it gets (never shown)."""

    scheme: str
    host: str  # an IPv6 address without its brackets
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, value: str, source: str) -> Proxy:
        """Read a proxy URL (``host:port`` means ``http://``); ``source`` names it in errors."""
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{source}: expected a proxy URL, got {_shown(value)}")
        text = value.strip()
        if "://" not in text:
            text = "http://" + text
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"{source}: not a valid proxy URL: {mask_url(text)!r}") from exc
        scheme = parts.scheme.lower()
        if scheme not in PROXY_PORTS:
            raise UsageError(
                f"{source}: unsupported proxy scheme {scheme!r} in {mask_url(text)!r}; "
                "use http://, https://, socks5:// or socks5h://"
            )
        if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise UsageError(
                f"{source}: expected scheme://[user:password@]host[:port], got {mask_url(text)!r}"
            )
        return cls(
            scheme,
            parts.hostname,
            port or PROXY_PORTS[scheme],
            None if parts.username is None else unquote(parts.username),
            None if parts.password is None else unquote(parts.password),
        )

    @property
    def is_socks(self) -> bool:
        return self.scheme in SOCKS_SCHEMES

    @property
    def authority(self) -> str:
        """``host:port``, an IPv6 address in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The proxy's URL without its credentials."""
        return f"{self.scheme}://{self.authority}"

    @property
    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value (Basic), or ``None`` without credentials."""
        if self.username is None:
            return None
        token = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(token).decode("ascii")

    @property
    def headers(self) -> dict[str, str]:
        """What every request to the proxy itself carries."""
        authorization = self.authorization
        return {} if authorization is None else {"Proxy-Authorization": authorization}

    def __str__(self) -> str:
        if self.username is None:
            return self.url
        secret = f":{MASK}" if self.password is not None else ""
        return f"{self.scheme}://{quote(self.username, safe='')}{secret}@{self.authority}"

    def __repr__(self) -> str:
        return f"Proxy({str(self)!r})"


class NoProxy:
    """The hosts ``NO_PROXY`` sends direct: a comma-separated list of entries.

    * ``*`` alone: every host.
    * a name, ``example.com``, ``.example.com`` or ``*.example.com``: that name
      and every name under it (case-insensitive; a trailing dot is ignored).
    * an IP address, ``10.1.2.3``, ``::1`` or ``[::1]``, and a CIDR block,
      ``10.0.0.0/8`` or ``fd00::/8``: URLs whose host is an address literal in
      it. Names are never resolved: ``127.0.0.1`` does not cover ``localhost``.
    * any of these but a CIDR with ``:port`` (``[::1]:8080`` for IPv6): only
      URLs to that port (the scheme's default port when the URL gives none).

    Spaces around entries and empty entries are ignored; anything else (a
    ``*`` inside a name, a port that is not a number) is a :class:`UsageError`.
    """

    def __init__(self, value: str, source: str = "NO_PROXY") -> None:
        self.everything = False
        self.names: list[tuple[str, int | None]] = []
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for raw in value.split(","):
            entry = raw.strip().lower()
            if entry:
                self._add(entry, source)

    def _add(self, entry: str, source: str) -> None:
        if entry == "*":
            self.everything = True
            return
        try:  # an address or a CIDR block, without a port
            self.networks.append((ipaddress.ip_network(entry, strict=False), None))
            return
        except ValueError:
            pass
        host, port = entry, None
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            if rest:
                port = _port(rest[1:] if rest.startswith(":") else "", entry, source)
        elif entry.count(":") == 1:
            host, _, text = entry.partition(":")
            port = _port(text, entry, source)
        try:
            self.networks.append((ipaddress.ip_network(host), port))
            return
        except ValueError:
            pass
        name = host.removeprefix("*.").removeprefix(".").rstrip(".")
        if not _NAME.fullmatch(name):
            raise UsageError(
                f"{source}: {entry!r} is not a host name, domain, IP address or CIDR block"
            )
        self.names.append((name, port))

    def bypass(self, host: str, port: int) -> bool:
        """True when a URL to ``host`` (a name or an address literal) on ``port`` goes direct."""
        if self.everything:
            return True
        host = host.strip("[]").rstrip(".").lower()
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return any(
                (host == name or host.endswith("." + name)) and wanted in (None, port)
                for name, wanted in self.names
            )
        return any(ip in network and wanted in (None, port) for network, wanted in self.networks)


def _port(text: str, entry: str, source: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 0 < int(text) < 65536:
        raise UsageError(f"{source}: {entry!r} has an invalid port")
    return int(text)


@dataclass(frozen=True)
class ProxyRoutes:
    """Which proxy each origin goes through: ``http`` and ``https`` by the URL's scheme."""

    http: Proxy | None
    https: Proxy | None
    no_proxy: NoProxy | None = None

    def route(self, scheme: str, host: str, port: int | None) -> Proxy | None:
        """The proxy for an origin, or ``None`` to connect directly."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None:
            return None
        no_proxy = self.no_proxy
        if no_proxy is not None and no_proxy.bypass(host, port or TARGET_PORTS[scheme]):
            return None
        return proxy

    @property
    def proxies(self) -> list[Proxy]:
        return [p for p in dict.fromkeys((self.http, self.https)) if p is not None]

    def __repr__(self) -> str:
        return f"ProxyRoutes(http={self.http!r}, https={self.https!r})"


def proxy_routes(settings: Settings) -> ProxyRoutes | None:
    """Read ``proxy`` and ``trust_env`` (marking them understood) and, if asked, the environment.

    ``None`` when calls go direct: no ``proxy`` setting and no proxy variable
    (or ``trust_env=False``).
    """
    value = settings.extra("proxy")
    trust_env = settings.extra("trust_env", True)
    if not isinstance(trust_env, bool):
        raise UsageError(f"setting 'trust_env' must be True or False, got {trust_env!r}")
    if value is not None:
        proxy = Proxy.parse(value, "setting 'proxy'")
        return ProxyRoutes(proxy, proxy)
    if not trust_env:
        return None
    return routes_from_environment(urllib.request.getproxies_environment())


def routes_from_environment(variables: dict[str, str]) -> ProxyRoutes | None:
    """The routes that ``getproxies_environment()``'s answer describes (``None``: direct)."""
    found: dict[str, Proxy] = {}
    for scheme in ("http", "https", "all"):
        value = variables.get(scheme)
        if value:
            found[scheme] = Proxy.parse(value, f"{scheme.upper()}_PROXY{_FROM_ENV}")
    http = found.get("http") or found.get("all")
    https = found.get("https") or found.get("all")
    if http is None and https is None:
        return None
    text = variables.get("no")
    no_proxy = NoProxy(text, f"NO_PROXY{_FROM_ENV}") if text else None
    return ProxyRoutes(http, https, no_proxy)


def _shown(value: Any) -> str:
    return repr(mask_url(value)) if isinstance(value, str) else repr(value)
