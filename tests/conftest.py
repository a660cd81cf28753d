"""Shared fixtures: real servers on loopback, and a Dispatcher that is always closed."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from dispatchkit import Dispatcher
from support.node_peer import NODE, node_peer

IN_CI = bool(os.environ.get("CI"))


def pytest_configure(config: pytest.Config) -> None:
    if sys.version_info < (3, 11):
        # Python 3.10's asyncio leaves the SSL transport of a failed TLS handshake
        # unclosed (its SSL protocol was rewritten in 3.11, which closes it): a
        # ResourceWarning from the standard library when the garbage collector gets to
        # it, in whichever test is running then. Ignored there, and only that one.
        config.addinivalue_line(
            "filterwarnings",
            "ignore:Exception ignored in. <function _SSLProtocolTransport.__del__"
            ":pytest.PytestUnraisableExceptionWarning",
        )


def require(condition: bool, why: str) -> None:
    """Skip a test whose real part is missing here; in CI, fail instead."""
    if not condition:
        if IN_CI:
            pytest.fail(f"{why} (CI must have it)")
        pytest.skip(why)


@pytest.fixture(scope="session")
def peer() -> Iterator[str]:
    """Base URL of the Node.js task server (the non-Python peer)."""
    require(NODE is not None, "node is not installed")
    with node_peer() as url:
        yield url


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    """A Dispatcher with quick retries, closed after the test."""
    with Dispatcher(timeout=5, retry_backoff=0.01) as d:
        yield d


@pytest.fixture
def make_dispatcher() -> Iterator[Any]:
    """Build Dispatchers with any settings; all are closed after the test."""
    made: list[Dispatcher] = []

    def make(**settings: Any) -> Dispatcher:
        settings.setdefault("timeout", 5)
        settings.setdefault("retry_backoff", 0.01)
        d = Dispatcher(**settings)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def peer_stats(d: Dispatcher, base: str) -> dict[str, int]:
    """Connections and requests the peer has seen since its last reset."""
    stats: dict[str, int] = d.call(f"{base}/stats")
    return stats
