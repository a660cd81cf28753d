"""An example dispatchkit plugin, registered through the entry point ``example``."""

from __future__ import annotations

import threading

from dispatchkit import Outcome, Request, hookimpl

HEADER = "X-Dispatchkit-Example"


class ExamplePlugin:
    """Tags every attempt with a header and counts finished calls."""

    name = "example"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.failures = 0

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        request.headers[HEADER] = f"attempt={request.attempt}"

    @hookimpl
    def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
        with self._lock:
            self.calls += 1
            if not outcome.ok:
                self.failures += 1
