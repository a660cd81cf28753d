"""dispatchkit: call HTTP callback tasks through a pluggable, pooled dispatcher."""

from __future__ import annotations

from dispatchkit._dispatcher import Dispatcher
from dispatchkit._models import Codec, Envelope, Outcome, PluginInfo, Request, Response, Transport
from dispatchkit._version import __version__
from dispatchkit.exceptions import (
    ConnectError,
    DispatchError,
    DispatchTimeout,
    EncodeError,
    HTTPStatusError,
    InvalidResponseError,
    PluginLoadError,
    RemoteExecuteError,
    ResponseTooLargeError,
    TransportError,
    UnknownStatusError,
    UsageError,
)
from dispatchkit.hookspecs import hookimpl

__all__ = [
    "Codec",
    "ConnectError",
    "DispatchError",
    "DispatchTimeout",
    "Dispatcher",
    "EncodeError",
    "Envelope",
    "HTTPStatusError",
    "InvalidResponseError",
    "Outcome",
    "PluginInfo",
    "PluginLoadError",
    "RemoteExecuteError",
    "Request",
    "Response",
    "ResponseTooLargeError",
    "Transport",
    "TransportError",
    "UnknownStatusError",
    "UsageError",
    "__version__",
    "hookimpl",
]
