"""The endpoint guards' circuit breakers as an observable gauge.

The plugin sees each dispatcher's guard as the ``dispatchkit_endpoint_guard``
hook returns it (its wrapper, :meth:`~dispatchkit_otel.OtelPlugin.dispatchkit_endpoint_guard`),
and reads it through the guard's public API, ``states(now)``, when a metric
reader collects: nothing is done per call. An instrument is made once per
meter (a second gauge of the same name would be refused, and its callback
dropped), so one :class:`BreakerGauge` per meter reads every guard watched
through it, and forgets a guard when its dispatcher is closed (or collected).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from opentelemetry.metrics import CallbackOptions, Observation

from dispatchkit_otel._semconv import (
    BREAKER_STATE,
    BREAKER_STATES,
    SERVER_ADDRESS,
    SERVER_PORT,
    URL_SCHEME,
    url_server,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter
    from opentelemetry.util.types import AttributeValue

    from dispatchkit import EndpointGuard

log = logging.getLogger("dispatchkit.otel")


class BreakerGauge:
    """``dispatchkit.circuit_breaker.state`` of one meter: per origin with a breaker, 1 for
    its state and 0 for the two others, read from every watched guard at collection."""

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        # id(guard) -> a callable that gives the guard back (None once it is gone).
        self._guards: dict[int, Callable[[], EndpointGuard | None]] = {}
        meter.create_observable_gauge(
            BREAKER_STATE,
            callbacks=[self._observe],
            unit="1",
            description="Circuit breakers of the endpoint guard, per origin: 1 for the "
            "breaker's state (closed, open, half-open), 0 for the others.",
        )

    def watch(self, guard: EndpointGuard) -> None:
        try:
            ref: Callable[[], EndpointGuard | None] = weakref.ref(guard)
        except TypeError:  # a guard without weak references: held until unwatched
            ref = lambda: guard  # noqa: E731
        with self._lock:
            self._guards[id(guard)] = ref

    def unwatch(self, guard: EndpointGuard) -> None:
        with self._lock:
            self._guards.pop(id(guard), None)

    def _observe(self, options: CallbackOptions) -> Iterator[Observation]:
        with self._lock:
            refs = list(self._guards.items())
        now = time.time()
        for key, ref in refs:
            guard = ref()
            if guard is None:
                with self._lock:
                    self._guards.pop(key, None)
                continue
            try:
                states = guard.states(now)
            except Exception:  # a shared store out of reach: the others still report
                log.warning("could not read the endpoint guard %r", guard, exc_info=True)
                continue
            for state in states:
                if state.breaker is None:
                    continue
                attributes = origin_attributes(state.origin)
                for name in BREAKER_STATES:
                    yield Observation(
                        1 if state.breaker == name else 0, {**attributes, BREAKER_STATE: name}
                    )


def origin_attributes(origin: str) -> dict[str, AttributeValue]:
    """``url.scheme``, ``server.address`` and ``server.port`` of ``scheme://host:port``."""
    address, port = url_server(origin)
    attributes: dict[str, AttributeValue] = {
        URL_SCHEME: origin.partition(":")[0],
        SERVER_ADDRESS: address,
    }
    if port is not None:
        attributes[SERVER_PORT] = port
    return attributes


_GAUGES: dict[int, tuple[Meter, BreakerGauge]] = {}
_GAUGES_LOCK = threading.Lock()


def breaker_gauge(meter: Meter) -> BreakerGauge:
    """The gauge of ``meter``, made at the first need (meters live as long as their provider)."""
    with _GAUGES_LOCK:
        entry = _GAUGES.get(id(meter))
        if entry is None or entry[0] is not meter:
            entry = _GAUGES[id(meter)] = (meter, BreakerGauge(meter))
        return entry[1]
