"""The benchmark's worker app: ``dispatchkit_celery.worker``'s app plus two no-op tasks.

``celery -A benchmarks.celery_app worker`` (what
``celery_worker(..., app="benchmarks.celery_app")`` starts) is the plugin's
own worker, configured the same way (JSON, ``task_acks_late``, prefetch 1,
Redis broker and backend, the ledger's poller), with tasks that do nothing:
Celery's own ceiling, measured in the same worker as dispatchkit's task.

* :data:`NOOP` returns 100 (what the benchmark's target answers), its result
  stored in the backend like a dispatchkit call's.
* :data:`NOOP_COUNTED` stores no result (``ignore_result``); it counts itself
  in Redis, and the one that makes the count reach ``total`` pushes to
  ``<key>:done``: the caller's honest signal that every message has run.
"""

from __future__ import annotations

import os

import redis
from dispatchkit_celery.worker import app

__all__ = ["NOOP", "NOOP_COUNTED", "app"]

NOOP = "benchmarks.noop"
NOOP_COUNTED = "benchmarks.noop_counted"

_client: tuple[int, redis.Redis] | None = None


def _redis() -> redis.Redis:
    """This process's client of the broker's Redis (a forked pool process makes its own)."""
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis.from_url(str(app.conf.broker_url)))
    return _client[1]


def noop(x: int, y: int) -> int:
    return 100


def noop_counted(key: str, total: int) -> None:
    client = _redis()
    if client.incr(key) == total:
        client.lpush(f"{key}:done", 1)


app.task(name=NOOP)(noop)
app.task(name=NOOP_COUNTED, ignore_result=True)(noop_counted)
