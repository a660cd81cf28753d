"""Standard Webhooks signatures (https://www.standardwebhooks.com), both halves.

The one implementation of the scheme in dispatchkit: the built-in ``signing``
plugin signs outgoing calls with it once ``Dispatcher(signing_secret=...)`` is
set, :class:`~dispatchkit.server.TaskApp` verifies incoming ones with it, and
any Python server can call :func:`verify`. It needs nothing but the standard
library.

Every request carries three headers::

    webhook-id: <the task id, the same on every attempt>
    webhook-timestamp: <integer Unix seconds of this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{payload}")> [v1,...]

one ``v1,`` signature per key (several during a key rotation). The *payload*
is the body for POST, PUT and PATCH; for GET, HEAD, DELETE and OPTIONS, which
send no body, it is the raw query string exactly as sent in the request
target: what follows ``?`` up to any ``#``, without the ``?``, and empty when
there is none (WSGI's ``QUERY_STRING``). See ``docs/security.md``.

A sender with one key per receiver gives ``signing_keys`` (a :class:`KeyStore`:
key ids to keys, or the environment) and names the key per call with the
option ``signing_key``; the id travels with the call, the key stays on the
machine that sends it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from secrets import token_bytes
from typing import TYPE_CHECKING

from urllib3.util import parse_url

from dispatchkit._checks import seconds
from dispatchkit._encoding import QUERY_METHODS, SENT_AS_IS
from dispatchkit.exceptions import SignatureError, UsageError

if TYPE_CHECKING:
    from dispatchkit._models import Request

__all__ = [
    "DEFAULT_TOLERANCE",
    "ID_HEADER",
    "KEY_ENV_PREFIX",
    "KEY_OPTION",
    "MIN_KEY_BYTES",
    "SECRET_PREFIX",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "KeyStore",
    "KeyStoreInput",
    "SecretInput",
    "SignatureError",
    "SigningKeys",
    "check",
    "generate_secret",
    "query_payload",
    "request_payload",
    "sign_request",
    "signs_body",
    "verify",
]

SECRET_PREFIX = "whsec_"
#: The spec's minimum key size: 24 random bytes (192 bits).
MIN_KEY_BYTES = 24
#: Seconds a timestamp may differ from the verifier's clock, either way.
DEFAULT_TOLERANCE = 300.0
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
_OWN_HEADERS = frozenset({ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER})
_MASKED = SECRET_PREFIX + "***"

# An id with a "." would make "{id}.{timestamp}.{payload}" ambiguous (the spec
# forbids it); printable ASCII otherwise, bounded so the replay cache stays small.
_ID = re.compile(r"[!-\-/-~]{1,256}")
_TIMESTAMP = re.compile(r"[0-9]{1,15}")
# A bound on the signatures one header may make the verifier look at.
_MAX_SIGNATURES = 32
#: The call option that names the key to sign with: ``options={"signing_key": "acme"}``.
KEY_OPTION = "signing_key"
#: Where ``signing_keys="env"`` looks: key ``acme-eu`` is ``DISPATCHKIT_SIGNING_KEY_ACME_EU``.
KEY_ENV_PREFIX = "DISPATCHKIT_SIGNING_KEY_"
# A key id travels with calls and shows in messages; it also names an environment variable.
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True, repr=False)
class SigningKeys:
    """One or more HMAC keys, parsed once; its ``repr`` shows ``whsec_***`` only.

    Build it with :meth:`parse`. Signing uses every key (one signature each);
    verifying accepts a signature by any of them.
    """

    keys: tuple[bytes, ...]

    @classmethod
    def parse(cls, secret: SecretInput, *, name: str = "signing secret") -> SigningKeys:
        """Parse ``"whsec_<base64>"`` strings or raw ``bytes`` keys, one or a list.

        Raises :class:`~dispatchkit.UsageError` (a ``ValueError``) for anything
        else: a str without the ``whsec_`` prefix, invalid base64, a key under
        :data:`MIN_KEY_BYTES` bytes, an empty list. The message never shows the
        secret; ``name`` is how it refers to the setting.
        """
        if isinstance(secret, SigningKeys):
            return secret
        if isinstance(secret, (str, bytes, bytearray)):
            return cls((_key(secret, name),))
        try:
            items = list(secret)
        except TypeError:
            raise UsageError(
                f"{name} must be a 'whsec_<base64>' str, bytes or a list of them, "
                f"got {type(secret).__name__}"
            ) from None
        if not items:
            raise UsageError(f"{name} is an empty list")
        return cls(tuple(_key(item, f"{name} #{n}") for n, item in enumerate(items, 1)))

    def __repr__(self) -> str:
        return f"SigningKeys({', '.join([_MASKED] * len(self.keys))})"

    def __len__(self) -> int:
        return len(self.keys)

    def signature(self, msg_id: str, timestamp: str, payload: bytes) -> str:
        """The ``webhook-signature`` value: ``v1,<base64>`` per key, space-separated."""
        message = _message(msg_id, timestamp, payload)
        return " ".join(
            "v1," + base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()
            for key in self.keys
        )

    def matches(self, msg_id: str, timestamp: str, payload: bytes, header: str) -> bool:
        """Whether any ``v1`` signature in ``header`` is by one of the keys.

        Compared in constant time; other versions (``v1a``) and malformed
        entries are skipped, as the spec asks.
        """
        message = _message(msg_id, timestamp, payload)
        expected = [hmac.new(key, message, hashlib.sha256).digest() for key in self.keys]
        for entry in header.split()[:_MAX_SIGNATURES]:
            version, comma, value = entry.partition(",")
            if version != "v1" or not comma:
                continue
            try:
                given = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                continue
            if any(hmac.compare_digest(given, digest) for digest in expected):
                return True
        return False


#: A secret as given: ``"whsec_<base64>"``, the raw key as bytes, a list of
#: those (key rotation), or :class:`SigningKeys` already parsed.
SecretInput = str | bytes | SigningKeys | Iterable[str | bytes]


def _key(secret: object, name: str) -> bytes:
    if isinstance(secret, (bytes, bytearray)):
        key = bytes(secret)
    elif isinstance(secret, str):
        if not secret.startswith(SECRET_PREFIX):
            raise UsageError(
                f"{name} must start with {SECRET_PREFIX!r} (a str is 'whsec_<base64>'; "
                "pass the raw key as bytes)"
            )
        text = secret[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(f"{name} is not valid base64 after {SECRET_PREFIX!r}") from None
    else:
        raise UsageError(f"{name} must be a str or bytes, got {type(secret).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(
            f"{name} is {len(key)} bytes; Standard Webhooks keys have at least {MIN_KEY_BYTES}"
        )
    return key


@dataclass(frozen=True, slots=True, repr=False, eq=False)
class KeyStore:
    """Key ids to :class:`SigningKeys`, where calls are signed; reprs show ids, never keys.

    Build it with :meth:`parse` (what ``Dispatcher(signing_keys=...)`` does) or
    :meth:`from_env`. A call names its key with ``options={"signing_key": id}``:
    the id travels with the call (a Celery message, a ledger record), the key
    is looked up on the machine that sends the request, by :meth:`resolve`.
    """

    #: Key ids to their keys, parsed once (a mapping given).
    keys: Mapping[str, SigningKeys] | None = None
    #: A function from a key id to its secret(s), or ``None`` when it has no such key.
    lookup: Callable[[str], SecretInput | None] | None = None
    #: The prefix of the environment variables that hold the keys.
    env_prefix: str | None = None

    @classmethod
    def parse(cls, keys: KeyStoreInput, *, name: str = "signing_keys") -> KeyStore:
        """A store from a mapping of key ids to secrets, a look-up function, or ``"env"``.

        In a mapping each id (1 to 128 letters, digits, ``_``, ``-`` or ``.``,
        starting with a letter or a digit) maps to what ``signing_secret`` takes:
        one secret, or a list of them during a key rotation (one signature per
        key); every secret is parsed here. A function is called with the id on
        every attempt and returns the same, or ``None`` for an id it does not
        know. ``"env"`` is :meth:`from_env`. Anything else is a
        :class:`~dispatchkit.UsageError` that never shows a secret.
        """
        if isinstance(keys, KeyStore):
            return keys
        if isinstance(keys, str):
            if keys == "env":
                return cls.from_env()
            raise UsageError(  # the str is not shown: it may be a secret given by mistake
                f"{name} takes a mapping of key ids to secrets, a function or 'env'; "
                "one secret for every call is signing_secret"
            )
        if isinstance(keys, Mapping):
            if not keys:
                raise UsageError(f"{name} is empty")
            parsed = {}
            for n, (key_id, secret) in enumerate(keys.items(), 1):
                if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                    raise UsageError(
                        f"{name}: key id #{n} is not 1 to 128 letters, digits, '_', '-' or '.' "
                        "starting with a letter or a digit"
                    )
                parsed[key_id] = SigningKeys.parse(secret, name=f"{name}[{key_id!r}]")
            return cls(keys=parsed)
        if callable(keys):
            return cls(lookup=keys)
        raise UsageError(
            f"{name} must be a mapping of key ids to secrets, a function or 'env', "
            f"got {type(keys).__name__}"
        )

    @classmethod
    def from_env(cls, prefix: str = KEY_ENV_PREFIX) -> KeyStore:
        """Keys from the environment of the process that sends: ``<prefix><ID>``.

        ``<ID>`` is the key id upper-cased, with ``-`` and ``.`` as ``_``: key
        ``acme-eu`` is ``DISPATCHKIT_SIGNING_KEY_ACME_EU``. The value is one
        secret, or several separated by spaces or commas during a key rotation.
        Read on every attempt, so each Celery worker signs with the keys of its
        own environment.
        """
        if not _ENV_PREFIX.fullmatch(prefix):
            raise UsageError(f"environment prefix {prefix!r} is not a variable name")
        return cls(env_prefix=prefix)

    def env_name(self, key_id: str) -> str:
        """The environment variable that holds ``key_id`` (for a store from the environment)."""
        return (self.env_prefix or KEY_ENV_PREFIX) + key_id.upper().replace("-", "_").replace(
            ".", "_"
        )

    def resolve(self, key_id: str) -> SigningKeys:
        """The keys of ``key_id``; a :class:`~dispatchkit.UsageError` if this store has none.

        The message names the id (ids are not secret) and where it was looked for.
        """
        if not _KEY_ID.fullmatch(key_id):
            raise UsageError(  # not shown: what is not an id may be a secret given by mistake
                f"the option {KEY_OPTION!r} is not a key id: 1 to 128 letters, digits, "
                "'_', '-' or '.' starting with a letter or a digit"
            )
        if self.keys is not None:
            keys = self.keys.get(key_id)
            if keys is None:
                raise UsageError(
                    f"unknown signing key {key_id!r}: not one of the {len(self.keys)} "
                    "of signing_keys"
                )
            return keys
        if self.lookup is not None:
            secret = self.lookup(key_id)
            if secret is None:
                raise UsageError(
                    f"unknown signing key {key_id!r}: the signing_keys function has no such key"
                )
            return SigningKeys.parse(secret, name=f"the signing key {key_id!r}")
        name = self.env_name(key_id)
        value = os.environ.get(name, "").replace(",", " ").split()
        if not value:
            raise UsageError(f"unknown signing key {key_id!r}: {name} is not set on this machine")
        return SigningKeys.parse(value, name=name)

    def __repr__(self) -> str:
        if self.keys is not None:
            return f"KeyStore({dict(self.keys)!r})"
        if self.lookup is not None:
            # the function's name only: a partial's repr would show what it is bound to
            shown = getattr(self.lookup, "__qualname__", type(self.lookup).__name__)
            return f"KeyStore(lookup={shown})"
        return f"KeyStore(env={self.env_prefix}*)"


#: What ``signing_keys`` takes: key ids to secrets (each one, or a list during a
#: rotation), a function from a key id to its secret(s) or ``None``, ``"env"``
#: (:meth:`KeyStore.from_env`), or a :class:`KeyStore`.
KeyStoreInput = Mapping[str, SecretInput] | Callable[[str], SecretInput | None] | str | KeyStore


def _message(msg_id: str, timestamp: str, payload: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + payload


def generate_secret(nbytes: int = 32) -> str:
    """A new random secret as ``"whsec_<base64>"`` (``nbytes`` random bytes, at least 24)."""
    if nbytes < MIN_KEY_BYTES:
        raise UsageError(f"a key needs at least {MIN_KEY_BYTES} bytes, got {nbytes}")
    return SECRET_PREFIX + base64.b64encode(token_bytes(nbytes)).decode()


def query_payload(url: str) -> bytes:
    """The signed payload of a request without a body: its query string as sent.

    The part of ``url`` after ``?`` and before any ``#``, without the ``?``;
    ``b""`` when there is none. Characters that HTTP clients percent-encode
    before sending (spaces, non-ASCII, lower-case ``%xx`` escapes) are encoded
    first, exactly as urllib3 does, so the payload is what goes on the wire.
    """
    _, mark, query = url.partition("#")[0].partition("?")
    if not mark or not query:
        return b""
    if not SENT_AS_IS.fullmatch(query):
        query = parse_url(url).query or ""
    return query.encode("ascii")


def signs_body(method: str) -> bool:
    """Whether a request of ``method`` signs its body (POST, PUT, PATCH) or its query string."""
    return method.upper() not in QUERY_METHODS


def request_payload(method: str, url: str, body: bytes | None) -> bytes:
    """The signed payload: ``body`` for POST, PUT, PATCH; the query string otherwise."""
    return (body or b"") if signs_body(method) else query_payload(url)


def sign_request(request: Request, keys: SigningKeys, now: float | None = None) -> None:
    """Set the three ``webhook-*`` headers of ``request`` for this attempt.

    The id is ``request.task_id``; the timestamp is ``now`` (default: the
    current time) in whole seconds. Headers of those names given by the caller,
    in any case, are replaced. Raises :class:`SignatureError` when the task id
    cannot be a ``webhook-id`` (it has a ``.``, a space, or more than 256
    characters): nothing is sent.
    """
    msg_id = request.task_id
    if not _ID.fullmatch(msg_id):
        raise SignatureError(
            "cannot sign: a webhook-id (the task id) must be 1-256 printable ASCII "
            "characters without '.' or spaces",
            request=request,
        )
    timestamp = str(math.floor(time.time() if now is None else now))
    payload = request_payload(request.method, request.url, request.body)
    headers = request.headers
    for name in [name for name in headers if name.lower() in _OWN_HEADERS]:
        del headers[name]
    headers[ID_HEADER] = msg_id
    headers[TIMESTAMP_HEADER] = timestamp
    headers[SIGNATURE_HEADER] = keys.signature(msg_id, timestamp, payload)


def verify(
    headers: Mapping[str, str],
    payload: bytes | str,
    secrets: SecretInput,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Check a request's Standard Webhooks signature; raise :class:`SignatureError` if bad.

    ``headers`` are the request's headers, names in any case; ``payload`` is
    the raw body, or for GET and the other bodiless methods the raw query
    string (see :func:`query_payload`); ``secrets`` is one secret or several
    (any of them may have signed). The timestamp must be within ``tolerance``
    seconds of ``now`` (default: the current time), either way.

    This does not remember ids: to refuse replays inside the tolerance, keep
    the ``webhook-id`` of each accepted request for ``tolerance`` seconds (as
    :class:`~dispatchkit.server.TaskApp` does) and refuse one seen before.
    """
    keys = SigningKeys.parse(secrets)
    seconds(tolerance, "tolerance", zero=True)
    data = payload.encode() if isinstance(payload, str) else payload
    check(headers, data, keys, tolerance, time.time() if now is None else now)


def check(
    headers: Mapping[str, str], payload: bytes, keys: SigningKeys, tolerance: float, now: float
) -> tuple[str, int]:
    """:func:`verify` for callers that parsed the keys once; return the id and timestamp."""
    found: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _OWN_HEADERS:
            found[lowered] = value
    missing = [
        name for name in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER) if not found.get(name)
    ]
    if missing:
        raise SignatureError(f"missing signature header(s): {', '.join(missing)}")
    msg_id, stamp = found[ID_HEADER].strip(), found[TIMESTAMP_HEADER].strip()
    if not _ID.fullmatch(msg_id):
        raise SignatureError(
            "invalid webhook-id: 1-256 printable ASCII characters without '.' or spaces"
        )
    if not _TIMESTAMP.fullmatch(stamp):
        raise SignatureError("invalid webhook-timestamp: not an integer number of seconds")
    timestamp = int(stamp)
    if now - timestamp > tolerance:
        raise SignatureError(f"webhook-timestamp too old (tolerance {tolerance:g} s)")
    if timestamp - now > tolerance:
        raise SignatureError(f"webhook-timestamp too far in the future (tolerance {tolerance:g} s)")
    if not keys.matches(msg_id, stamp, payload, found[SIGNATURE_HEADER]):
        raise SignatureError("no valid signature: no v1 signature matches a known key")
    return msg_id, timestamp
