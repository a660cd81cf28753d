"""``dispatchkit endpoints list | enable URL | reset ORIGIN``: the shared endpoint guard.

The guard is the one a Dispatcher built from the environment gets: with
``DISPATCHKIT_EXECUTOR=celery`` (and the broker in ``DISPATCHKIT_CELERY_BROKER``),
the guard the Celery workers share in Redis. An in-process guard's state
lives inside the process that makes the calls (``dispatcher.endpoints``
there): this command has nothing to show of it, and says so (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

from dispatchkit._cli_output import say
from dispatchkit._dispatcher import Dispatcher
from dispatchkit._endpoints import EndpointState, endpoint_key
from dispatchkit.builtin.endpoints import MemoryGuard
from dispatchkit.exceptions import UsageError

__all__ = ["add_arguments", "run"]

_HEADER = ("ORIGIN", "BREAKER", "FAILURES", "RETRY IN", "COOLDOWN", "RATE", "IN FLIGHT")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="every origin: breaker, failures, reopening time, rate limit, calls in flight, "
        "disabled URLs",
        description="Show every origin the shared guard keeps state for.",
    )
    listing.add_argument("--json", action="store_true", help="one JSON array of origins")
    enable = actions.add_parser(
        "enable",
        help="enable a URL disabled by 410 Gone",
        description="Enable URL (its query is ignored) again for every worker.",
    )
    enable.add_argument("url", metavar="URL")
    reset = actions.add_parser(
        "reset",
        help="close an origin's breaker, fill its bucket, enable its URLs",
        description="Forget ORIGIN's state (any URL on it will do); calls in flight stay counted.",
    )
    reset.add_argument("origin", metavar="ORIGIN")


def run(args: argparse.Namespace) -> int:
    """Run the action; 1 when ``enable`` or ``reset`` found nothing to change."""
    with Dispatcher() as dispatcher:
        guard = dispatcher._pipeline.guard
        if guard is None or isinstance(guard, MemoryGuard):
            raise UsageError(
                f"the executor {dispatcher.settings.executor!r} keeps no shared endpoint state: "
                "an in-process guard's state lives inside the process that makes the calls "
                "(dispatcher.endpoints there). For the Celery workers' state, set "
                "DISPATCHKIT_EXECUTOR=celery and DISPATCHKIT_CELERY_BROKER (a Redis URL)"
            )
        endpoints = dispatcher.endpoints
        if args.action == "list":
            states = endpoints.list()
            if args.json:
                print(json.dumps([_as_dict(state) for state in states], indent=2))
            else:
                _table(states)
            return 0
        if args.action == "enable":
            url = endpoint_key(args.url)[1]
            if not endpoints.enable(url):
                say(f"{url} is not disabled")
                return 1
            print(f"enabled {url}")
            return 0
        origin = endpoint_key(args.origin)[0]
        if not endpoints.reset(origin):
            say(f"no state is kept for {origin}")
            return 1
        print(f"reset {origin}")
        return 0


def _as_dict(state: EndpointState) -> dict[str, Any]:
    shown = dataclasses.asdict(state)
    shown["disabled"] = list(state.disabled)
    shown["retry_in"] = None if state.retry_at is None else max(0.0, state.retry_at - time.time())
    return shown


def _table(states: list[EndpointState]) -> None:
    if not states:
        say("no origin has state yet")
        return
    now = time.time()
    rows = [_HEADER]
    for s in states:
        retry_in = "-" if s.retry_at is None else _seconds(max(0.0, s.retry_at - now))
        flight = str(s.in_flight) if s.concurrency is None else f"{s.in_flight}/{s.concurrency}"
        rows.append((
            s.origin, s.breaker or "-", str(s.failures), retry_in,
            "-" if s.cooldown is None else _seconds(s.cooldown), s.rate_limit or "-", flight,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER) - 1)]
    for i, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))
        if i:
            for url in states[i - 1].disabled:
                print(f"  disabled: {url}")


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"
