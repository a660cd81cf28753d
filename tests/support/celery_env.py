"""What the Celery tests share: a Redis test database, the ledger on it, and waiting.

Each test module uses a Redis database of its own (emptied before and after it),
so that modules never see each other's keys.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery.testing import flush, redis_reachable

from conftest import require

__all__ = ["eventually", "ledger_on", "redis_db"]


def eventually(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds, asked every ``interval``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@contextlib.contextmanager
def redis_db(url: str) -> Iterator[str]:
    """The Redis database at ``url``, empty; emptied again afterwards. Required in CI."""
    require(redis_reachable(url), f"Redis is not reachable at {url}")
    flush(url)
    try:
        yield url
    finally:
        flush(url)


@contextlib.contextmanager
def ledger_on(url: str) -> Iterator[Ledger]:
    """The workers' delivery ledger on ``url``, to look into; closed afterwards."""
    opened = Ledger(url)
    try:
        yield opened
    finally:
        opened.close()
