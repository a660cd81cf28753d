"""dispatchkit: call HTTP callback tasks through a pluggable, pooled dispatcher."""

from __future__ import annotations

from dispatchkit import states
from dispatchkit._async_dispatcher import AsyncDispatcher
from dispatchkit._compat import URL, HttpDispatchTask, default_dispatcher
from dispatchkit._dispatcher import Dispatcher
from dispatchkit._endpoints import Admission, EndpointGuard, Endpoints, EndpointState, Verdict
from dispatchkit._models import (
    AsyncTransport,
    Attempt,
    Call,
    Codec,
    Envelope,
    Executor,
    Outcome,
    PluginInfo,
    Request,
    Response,
    Result,
    Transport,
)
from dispatchkit._redact import mask_url
from dispatchkit._results import AsyncResult
from dispatchkit._settings import Settings
from dispatchkit._version import __version__
from dispatchkit.exceptions import (
    CircuitOpenError,
    ConnectError,
    DispatchError,
    DispatchTimeout,
    EgressDenied,
    EncodeError,
    EndpointDisabledError,
    HTTPStatusError,
    InvalidResponseError,
    PluginLoadError,
    RemoteExecuteError,
    ResponseTooLargeError,
    ResultTimeout,
    SignatureError,
    TransportError,
    UnknownStatusError,
    UsageError,
)
from dispatchkit.hookspecs import hookimpl

__all__ = [
    "Admission",
    "AsyncDispatcher",
    "AsyncResult",
    "AsyncTransport",
    "Attempt",
    "Call",
    "CircuitOpenError",
    "Codec",
    "ConnectError",
    "DispatchError",
    "DispatchTimeout",
    "Dispatcher",
    "EgressDenied",
    "EncodeError",
    "EndpointDisabledError",
    "EndpointGuard",
    "EndpointState",
    "Endpoints",
    "Envelope",
    "Executor",
    "HTTPStatusError",
    "HttpDispatchTask",
    "InvalidResponseError",
    "Outcome",
    "PluginInfo",
    "PluginLoadError",
    "RemoteExecuteError",
    "Request",
    "Response",
    "ResponseTooLargeError",
    "Result",
    "ResultTimeout",
    "Settings",
    "SignatureError",
    "Transport",
    "TransportError",
    "URL",
    "UnknownStatusError",
    "UsageError",
    "Verdict",
    "__version__",
    "default_dispatcher",
    "hookimpl",
    "mask_url",
    "states",
]
