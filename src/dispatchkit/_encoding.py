"""Encoding a task's keyword arguments, and its request headers, for the wire."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlsplit, urlunsplit

import orjson

from dispatchkit._checks import seconds
from dispatchkit._models import NO_OPTIONS, Call, Request
from dispatchkit.exceptions import EncodeError, UsageError

#: Methods whose arguments travel in the query string; the others send a body.
QUERY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
METHODS = QUERY_METHODS | BODY_METHODS

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"

Pairs = list[tuple[str, str]]

#: RFC 3986 path and query characters and upper-case %XX escapes: a request target made
#: only of these goes on the wire exactly as written; anything else is percent-encoded
#: first, the way urllib3 does it (the signing plugin signs what this sends).
SENT_AS_IS = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-F]{2})*")

#: RFC 9110 §5.1 and §5.5: a field name is a token; a value is visible latin-1
#: characters, spaces and tabs (never CR, LF, NUL or another control character).
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")

#: A call's options: at most this many, each a lower-case name (a plugin's prefix first,
#: ``signing_key``) and a value of printable ASCII, so that one can be logged as it is.
OPTIONS_MAX = 32
OPTION_VALUE_MAX = 256
_OPTION_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_OPTION_VALUE = re.compile(rf"[\x20-\x7e]{{0,{OPTION_VALUE_MAX}}}")
# Standard Webhooks secrets start so: one given as an option would travel with the call.
_SECRET_PREFIX = "whsec_"


def build_request(call: Call, headers: Mapping[str, str], timeout: float) -> Request:
    """The :class:`Request` that carries ``call`` over the wire: checked, encoded.

    ``headers`` are the Dispatcher's own (User-Agent, ...), ``timeout`` its
    default. The task id becomes the ``Idempotency-Key`` (a new one when the
    call has none); the call's options are checked (:func:`check_options`)
    and given to the request, never to the wire. Raises :class:`UsageError`
    or :class:`EncodeError`; nothing is sent before this succeeds.
    """
    url, task_id = call.url, call.task_id
    if not isinstance(url, str):
        raise UsageError(f"url must be a str, got {type(url).__name__}")
    if not isinstance(call.kwargs, Mapping):
        raise UsageError(
            f"a call's arguments must be a mapping of names to values, "
            f"got {type(call.kwargs).__name__}"
        )
    if task_id:
        check_header("Idempotency-Key", task_id)
    else:
        task_id = new_task_id()
    method = normalize_method(call.method)
    request_headers = dict(headers)
    if call.headers:
        if not isinstance(call.headers, Mapping):
            raise UsageError(
                f"headers must be a mapping of names to values, got {type(call.headers).__name__}"
            )
        check_headers(call.headers)
        _merge_headers(request_headers, call.headers)
    body: bytes | None = None
    if method in QUERY_METHODS:
        if call.json:
            raise UsageError(f"json=True needs a method with a body, not {method}")
        url = merge_query(url, form_pairs(call.kwargs))
    elif call.json:
        body = json_body(call.kwargs)
        request_headers["Content-Type"] = JSON
    else:
        body = form_body(form_pairs(call.kwargs))
        request_headers["Content-Type"] = FORM
    request_headers["Idempotency-Key"] = task_id
    if call.timeout is not None:
        timeout = seconds(call.timeout, "timeout")
    options = NO_OPTIONS if call.options is None else check_options(call.options)
    return Request(
        method, url, call.kwargs, request_headers, body, task_id, timeout, options=options
    )


def check_options(options: object) -> Mapping[str, str]:
    """A read-only copy of a call's ``options``; a :class:`UsageError` unless they are sound.

    At most :data:`OPTIONS_MAX` of them; a name is 1 to 64 of ``a-z``, ``0-9``
    and ``_``, starting with a letter; a value is a str of at most
    :data:`OPTION_VALUE_MAX` printable ASCII characters (space to ``~``).
    Options travel with the call (broker messages, ledger records), so a value
    that looks like a signing secret (``whsec_...``) is refused: an option
    names a key, the sending machine holds it.
    """
    if not isinstance(options, Mapping):
        raise UsageError(f"options must be a mapping of names to str, got {type(options).__name__}")
    if len(options) > OPTIONS_MAX:
        raise UsageError(f"a call takes at most {OPTIONS_MAX} options, got {len(options)}")
    for name, value in options.items():
        if not isinstance(name, str) or not _OPTION_NAME.fullmatch(name):
            raise UsageError(
                f"option name {name!r}: use 1 to 64 of a-z, 0-9 and _, starting with a letter"
            )
        if not isinstance(value, str):
            raise UsageError(
                f"option {name!r}: the value must be a str, got {type(value).__name__}"
            )
        if value.startswith(_SECRET_PREFIX):
            raise UsageError(
                f"option {name!r} holds a signing secret: options travel with the call "
                "(broker messages, records), so give the key's id and keep the secret in "
                "the sending Dispatcher's signing_keys"
            )
        if not _OPTION_VALUE.fullmatch(value):
            raise UsageError(  # the value is not shown: it may be something secret
                f"option {name!r}: the value must be at most {OPTION_VALUE_MAX} printable "
                f"ASCII characters (space to ~), got {len(value)} characters"
            )
    return MappingProxyType(dict(options))


def new_task_id() -> str:
    """A uuid4 in hex, as ``uuid.uuid4().hex`` makes it, at a third of the cost."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return raw.hex()


def _merge_headers(headers: dict[str, str], extra: Mapping[str, str]) -> None:
    """Add ``extra`` to ``headers``; a name given in any case replaces the default's."""
    lowered = {name.lower(): name for name in headers}
    for name, value in extra.items():
        existing = lowered.get(name.lower())
        if existing is not None and existing != name:
            del headers[existing]
        headers[name] = value


def normalize_method(method: object) -> str:
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise UsageError(
            f"unsupported HTTP method {method!r}; use one of {', '.join(sorted(METHODS))}"
        )
    return method.upper()


def _scalar(name: str, value: object) -> str:
    # bool first: it is an int too, and the protocol spells it true/false.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        try:
            return str(value)
        except ValueError as exc:  # an int past sys.get_int_max_str_digits()
            raise EncodeError(f"argument {name!r}: {exc}", argument=name) from exc
    raise EncodeError(
        f"argument {name!r}: a {type(value).__name__} cannot be form-encoded; "
        "pass str, int, float, bool or a list of them (or send a JSON body)",
        argument=name,
    )


def form_pairs(kwargs: Mapping[str, Any]) -> Pairs:
    """Flatten arguments into ``(key, value)`` pairs; lists become repeated keys.

    ``None`` leaves the argument out, as requests does with ``params``.
    """
    pairs: Pairs = []
    for name, value in kwargs.items():
        if not isinstance(name, str):
            raise EncodeError(
                f"argument name {name!r} is a {type(name).__name__}: a form or query "
                "takes str names (a JSON body takes others)",
                argument=str(name),
            )
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            pairs.extend((name, _scalar(name, item)) for item in value)
        else:
            pairs.append((name, _scalar(name, value)))
    return pairs


def merge_query(url: str, pairs: Pairs) -> str:
    """Add ``pairs`` to the query of ``url``; a keyword replaces a same-named query argument."""
    if not pairs:
        return url
    if "?" not in url and "#" not in url:
        return f"{url}?{_urlencode(pairs)}"  # the common case, without a parse
    parts = urlsplit(url)
    if parts.query:
        names = {name for name, _ in pairs}
        kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in names]
        pairs = kept + pairs
    return urlunsplit((parts.scheme, parts.netloc, parts.path, _urlencode(pairs), parts.fragment))


def _urlencode(pairs: Pairs) -> str:
    # urlencode() without its type dispatch: every value here is already a str.
    try:
        return "&".join(f"{_quoted(k)}={_quoted(v)}" for k, v in pairs)
    except UnicodeEncodeError as exc:
        name = next(k for k, v in pairs if not _utf8(k) or not _utf8(v))
        raise EncodeError(
            f"argument {name!r} is not valid Unicode text (a lone surrogate?): {exc.reason}",
            argument=name,
        ) from exc


def _quoted(text: str) -> str:
    # Letters and digits need no quoting, and most arguments are just that.
    return text if text.isascii() and text.isalnum() else quote_plus(text)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_header(name: object, value: object) -> None:
    """Raise :class:`UsageError` unless ``name: value`` can go on the wire as it is.

    http.client would refuse it only while sending (or send a header a CR/LF
    split in two); refused here, it is the caller's mistake, never retried.
    """
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise UsageError(f"header name {name!r} is not an RFC 9110 token")
    if not isinstance(value, str):
        raise UsageError(f"header {name}: the value must be a str, got {type(value).__name__}")
    if not _FIELD_VALUE.fullmatch(value):
        raise UsageError(
            f"header {name}: the value {value[:100]!r} holds a control character (CR, LF, NUL, "
            "...) or a character outside latin-1; encode it first (RFC 8187, base64, ...)"
        )


def check_headers(headers: Mapping[str, object]) -> None:
    """:func:`check_header` for every header of ``headers``."""
    for name, value in headers.items():
        check_header(name, value)


def form_body(pairs: Pairs) -> bytes:
    return _urlencode(pairs).encode("ascii")


def json_body(kwargs: Mapping[str, Any]) -> bytes:
    try:
        body = orjson.dumps(kwargs, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        name = next((k for k, v in kwargs.items() if not _json_ok(v)), "?")
        raise EncodeError(
            f"argument {name!r} cannot be JSON-encoded: {exc}", argument=name
        ) from exc
    # orjson writes NaN and the infinities as null; look for them only when a null is there.
    if b"null" in body:
        for name, value in kwargs.items():
            if _has_non_finite(value):
                raise EncodeError(
                    f"argument {name!r} holds NaN or an infinity, which JSON cannot carry "
                    "(it would arrive as null); send it as a string or leave it out",
                    argument=str(name),
                )
    return body


def _has_non_finite(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_has_non_finite(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False


def _json_ok(value: object) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True
