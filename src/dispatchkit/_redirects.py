"""Following a redirect, the same way in both transports (when ``follow_redirects`` allows)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

from dispatchkit._redact import mask_url
from dispatchkit.exceptions import InvalidResponseError, UsageError

#: The URL schemes the built-in transports speak.
SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie"})


def next_hop(
    url: str,
    location: str,
    status: int,
    method: str,
    body: bytes | None,
    headers: Mapping[str, str],
) -> tuple[str, str, bytes | None, Mapping[str, str]]:
    """The next hop of a redirect, as browsers and requests take it.

    A ``Location`` that is not a URL (a port past 65535, a host that cannot
    be one) is the server's error: :class:`InvalidResponseError`.
    """
    try:
        target = urljoin(url, location)
        scheme = urlsplit(target).scheme
        _origin(target)
    except ValueError as exc:
        raise InvalidResponseError(
            f"the redirect's Location is not a URL ({exc}): {location[:100]!r}", status=status
        ) from None
    if scheme not in SCHEMES:
        raise UsageError(f"redirect to an unsupported scheme: {mask_url(target)!r}")
    if status == 303 or (status in (301, 302) and method == "POST"):
        method, body = ("HEAD" if method == "HEAD" else "GET"), None
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    if _origin(target) != _origin(url):
        # Credentials were meant for the first origin, not wherever it points.
        headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIALS}
    return target, method, body, headers


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port
