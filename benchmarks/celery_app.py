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
* :data:`HTTP_CALL` makes the call dispatchkit's task makes, written by hand:
  a GET of ``url?x=..&y=..`` on a pooled urllib3 connection, the envelope
  read with orjson, its ``retval`` returned and stored; no ledger, no retry.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import redis
import urllib3
from dispatchkit_celery.worker import app

__all__ = ["HTTP_CALL", "NOOP", "NOOP_COUNTED", "app"]

NOOP = "benchmarks.noop"
NOOP_COUNTED = "benchmarks.noop_counted"
HTTP_CALL = "benchmarks.http_call"

_client: tuple[int, redis.Redis] | None = None
_pool: tuple[int, urllib3.PoolManager] | None = None


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


def http_call(url: str, x: int, y: int) -> Any:
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), urllib3.PoolManager(timeout=10.0))
    answer = _pool[1].request("GET", url, fields={"x": str(x), "y": str(y)}, retries=False)
    if answer.status != 200:
        raise RuntimeError(f"HTTP {answer.status}")
    return orjson.loads(answer.data)["retval"]


app.task(name=NOOP)(noop)
app.task(name=HTTP_CALL)(http_call)
app.task(name=NOOP_COUNTED, ignore_result=True)(noop_counted)
