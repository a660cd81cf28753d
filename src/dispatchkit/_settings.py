"""The settings of a Dispatcher: one frozen, validated value."""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dispatchkit._checks import count, iterate, seconds
from dispatchkit._redact import SECRET_NAME, mask_url
from dispatchkit._version import __version__
from dispatchkit.exceptions import UsageError

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of a Dispatcher; ``Dispatcher(**settings)`` fills it.

    Settings a plugin understands (``celery_broker=...``) are kept in
    :meth:`extra`; one that no plugin reads during configuration is an error,
    so a misspelt name never passes silently.
    """

    #: Seconds allowed to connect, to wait for a pooled connection, and between bytes read.
    timeout: float = 10.0
    #: Seconds one attempt may take in all (connect, TLS, send, headers, body), however
    #: the server trickles its bytes; ``None``: six times ``timeout``.
    deadline: float | None = None
    #: Keep-alive connections kept per host; also the most opened at once per host.
    pool_maxsize: int = 10
    #: Keep connections open between calls; ``False`` sends ``Connection: close`` and opens
    #: a new connection (and TLS handshake) for every call, as Celery 1.0's ``urlopen`` did.
    keep_alive: bool = True
    #: Hosts whose pools are kept; the least recently used pool beyond that is closed.
    max_pools: int = 64
    #: Largest response body accepted, in bytes.
    max_response_bytes: int = 16 * MiB
    #: Verify TLS certificates (against ``ca_certs`` when given, else the system store).
    verify: bool = True
    ca_certs: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    #: ``"any"`` (default) or ``"public"``: refuse loopback, private, link-local and other
    #: non-public addresses, checked on the address connected to (see docs/security.md).
    egress: str = "any"
    #: CIDRs and host names allowed whatever ``egress`` says.
    egress_allow: tuple[str, ...] = ()
    #: Redirects followed per attempt (0: none; a 3xx is an HTTPStatusError). Every hop
    #: passes the egress policy; Authorization is dropped when the origin changes.
    follow_redirects: int = 0
    #: Attempts per call, the first included; 1 turns retrying off.
    retry_attempts: int = 3
    #: Seconds a call may spend retrying, waits included; no retry starts past it.
    retry_max_time: float = 30.0
    #: First backoff in seconds; it doubles per attempt, with jitter.
    retry_backoff: float = 0.1
    #: Longest ``Retry-After`` honoured, in seconds.
    retry_after_cap: float = 10.0
    user_agent: str = f"dispatchkit/{__version__}"
    #: Which executor runs ``submit()``: ``"threads"`` (built in) or a plugin's name
    #: (``"celery"``); the environment variable ``DISPATCHKIT_EXECUTOR`` sets the default.
    executor: str = field(
        default_factory=lambda: os.environ.get("DISPATCHKIT_EXECUTOR") or "threads"
    )
    extras: Mapping[str, Any] = field(default_factory=dict)
    _read: set[str] = field(default_factory=set, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __repr__(self) -> str:
        shown = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if not f.name.startswith("_") and f.name != "extras"
        }
        # A plugin's secret (signing_secret=...) may be among the extras: never show one.
        shown["extras"] = {name: _masked(name, value) for name, value in self.extras.items()}
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def __post_init__(self) -> None:
        for name in ("timeout", "retry_max_time", "retry_after_cap"):
            seconds(getattr(self, name), f"setting {name!r}")
        if self.deadline is not None:
            seconds(self.deadline, "setting 'deadline'")
        seconds(self.retry_backoff, "setting 'retry_backoff'", zero=True)
        for name in ("pool_maxsize", "max_pools", "max_response_bytes", "retry_attempts"):
            count(getattr(self, name), f"setting {name!r}")
        if self.egress not in ("any", "public"):
            raise UsageError(f"setting 'egress' must be 'any' or 'public', got {self.egress!r}")
        object.__setattr__(self, "egress_allow", _allowed(self.egress_allow))
        count(self.follow_redirects, "setting 'follow_redirects'", minimum=0, maximum=30)
        if not isinstance(self.executor, str) or not self.executor:
            raise UsageError(f"setting 'executor' must be a name, got {self.executor!r}")
        if self.client_key is not None and self.client_cert is None:
            raise UsageError("setting 'client_key' needs 'client_cert'")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Settings:
        known = {f.name for f in fields(cls) if not f.name.startswith("_") and f.name != "extras"}
        core = {k: v for k, v in kwargs.items() if k in known}
        extras = {k: v for k, v in kwargs.items() if k not in known}
        return cls(**core, extras=extras)

    def extra(self, name: str, default: Any = None) -> Any:
        """Return the plugin setting ``name`` (or ``default``) and mark it as understood."""
        with self._lock:
            self._read.add(name)
        return self.extras.get(name, default)

    def unread_extras(self) -> list[str]:
        with self._lock:
            return sorted(set(self.extras) - self._read)


def _masked(name: str, value: Any) -> Any:
    if SECRET_NAME.search(name):
        return "***"
    if isinstance(value, str) and "://" in value:
        return mask_url(value)  # a broker URL's password
    return value


def _allowed(entries: object) -> tuple[str, ...]:
    """Setting ``egress_allow``: a list of host names and CIDRs, each CIDR one that parses."""
    message = "setting 'egress_allow' takes a list of CIDRs and host names"
    if isinstance(entries, (str, bytes)):
        raise UsageError(message)
    names: list[str] = []
    for entry in iterate(entries, message):
        if not isinstance(entry, str) or not entry:
            raise UsageError(f"{message}, got {entry!r}")
        if "/" in entry:  # a CIDR, never a host name
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise UsageError(
                    f"setting 'egress_allow': {entry!r} is not a CIDR: {exc}"
                ) from None
        names.append(entry)
    return tuple(names)
