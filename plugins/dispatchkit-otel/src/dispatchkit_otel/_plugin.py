"""The plugin: its hooks, present only when something will record what they see."""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING

from dispatchkit import Attempt, Call, EndpointGuard, Outcome, Request, Settings, hookimpl

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from dispatchkit import Dispatcher
    from dispatchkit_otel._client import ClientTelemetry

__all__ = ["OtelPlugin", "configured"]

NAME = "otel"
_HOOKS = (
    "dispatchkit_submit_options",
    "dispatchkit_prepare_request",
    "dispatchkit_attempt_done",
    "dispatchkit_call_done",
    "dispatchkit_endpoint_guard",
    "dispatchkit_close",
)
#: Where the API keeps its global providers, and the default (proxy, no-op) ones it gives
#: until an SDK sets its own: their classes live in these very modules.
_GLOBALS = (
    ("opentelemetry.trace", "get_tracer_provider"),
    ("opentelemetry.metrics", "get_meter_provider"),
)
_PROVIDER_ENV = ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER")


def configured() -> bool:
    """Whether a global tracer or meter provider is set (an SDK's, not the API's default).

    No import happens here: an OpenTelemetry API that nobody imported has no
    provider set, unless its environment names one to load.
    """
    for module_name, getter in _GLOBALS:
        api = sys.modules.get(module_name)
        if api is not None:
            provider = getattr(api, getter)()
            if not type(provider).__module__.startswith(module_name):
                return True
    return any(os.environ.get(name) for name in _PROVIDER_ENV)


class OtelPlugin:
    """Traces each call and each of its attempts, and records their metrics.

    Registered through the entry point ``otel``: every Dispatcher and
    AsyncDispatcher gets one. ``tracer_provider`` and ``meter_provider``
    default to OpenTelemetry's global ones.

    With neither given and no global provider set when the Dispatcher is
    built (:func:`configured`), nothing would record what the hooks see: the
    plugin then implements no hook at all, so that the Dispatcher calls none
    and records no attempts for it, and ``active`` is ``False``. Configure
    OpenTelemetry before building Dispatchers, or pass a provider (the global
    one, ``trace.get_tracer_provider()``, follows a later configuration).
    """

    name = NAME
    _telemetry: ClientTelemetry

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.active = tracer_provider is not None or meter_provider is not None or configured()
        if not self.active:
            # pluggy finds hooks by attribute on the instance: these shadow the methods.
            for hook in _HOOKS:
                setattr(self, hook, None)
            return
        # Imported only now: a dormant plugin costs the process no OpenTelemetry import.
        from dispatchkit_otel._client import ClientTelemetry

        self._telemetry = ClientTelemetry(tracer_provider, meter_provider)

    def __repr__(self) -> str:
        return f"<OtelPlugin {'active' if self.active else 'dormant'}>"

    @hookimpl
    def dispatchkit_submit_options(self, call: Call) -> Mapping[str, str] | None:
        # In the submitter's thread: its span context travels with the call, to a worker too.
        from dispatchkit_otel._client import submit_options

        return submit_options()

    # First, so that the attempt's span covers the other plugins' preparations, and the
    # trace headers are in place before any of them reads (or signs) the headers.
    @hookimpl(tryfirst=True)
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self._telemetry.attempt_starts(request)

    @hookimpl
    def dispatchkit_attempt_done(self, request: Request, attempt: Attempt) -> None:
        self._telemetry.attempt_ends(request, attempt)

    @hookimpl
    def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
        self._telemetry.call_ends(request, outcome)

    # A wrapper sees the guard whichever plugin made it, and changes nothing.
    @hookimpl(wrapper=True)
    def dispatchkit_endpoint_guard(
        self, settings: Settings
    ) -> Generator[None, EndpointGuard | None, EndpointGuard | None]:
        guard = yield
        if guard is not None:
            self._telemetry.watch(guard)  # its breakers, read when metrics are collected
        return guard

    @hookimpl
    def dispatchkit_close(self, dispatcher: Dispatcher) -> None:
        self._telemetry.close()
