"""One Dispatcher shared between threads: correct results, connections bounded by the pool."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from conftest import peer_stats
from dispatchkit import Request, hookimpl


def test_shared_between_threads(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(pool_maxsize=4)
    d.call(f"{peer}/stats/reset")

    def work(n: int) -> list[tuple[int, int]]:
        method = "GET" if n % 2 else "POST"
        return [
            (n * 1000 + i, d.call(f"{peer}/multiply", method, x=n * 1000 + i, y=3))
            for i in range(60)
        ]

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = [pair for chunk in pool.map(work, range(12)) for pair in chunk]
    assert len(results) == 12 * 60
    assert all(product == x * 3 for x, product in results)
    stats = peer_stats(d, peer)
    assert stats["requests"] == 12 * 60 + 1
    # 12 threads, a pool of 4: threads wait for a connection instead of opening more.
    assert 1 <= stats["connections"] <= 4


_caller = contextvars.ContextVar("caller", default="none")


class _SeesContext:
    """Writes the context variable its hook sees on the executor's thread into a header."""

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        request.headers["X-Caller"] = _caller.get()


def test_a_submitted_call_runs_in_the_submitters_context(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(plugins=[_SeesContext()])
    token = _caller.set("submitter")
    try:
        result = d.submit(f"{peer}/echo")
    finally:
        _caller.reset(token)
    assert result.get(timeout=10)["headers"]["x-caller"] == "submitter"
    assert d.submit(f"{peer}/echo").get(timeout=10)["headers"]["x-caller"] == "none"
