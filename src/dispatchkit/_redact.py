"""What messages may show: URLs with secrets masked, bodies cut to an excerpt."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query keys whose values are credentials often enough that they never go into a message.
SECRET_NAME = _SECRET_KEY = re.compile(
    r"(pass|secret|token|key|sig|auth|credential|session|cookie|code)", re.IGNORECASE
)


def mask_url(url: str) -> str:
    """Return ``url`` with the userinfo password and secret-looking query values masked.

    Used for every message, log line and ``repr`` that shows a URL. Never raises:
    a string that is not a URL comes back with nothing masked that could not be parsed.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon else f"{user}@{hostport}"
    query = parts.query
    if query and _SECRET_KEY.search(query):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_KEY.search(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


EXCERPT_BYTES = 200


def excerpt(body: bytes, limit: int = EXCERPT_BYTES) -> str:
    """Quote at most ``limit`` bytes of ``body`` for a message."""
    text = body[:limit].decode("utf-8", "replace")
    return repr(text) + ("..." if len(body) > limit else "")
