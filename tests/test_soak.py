"""The CI-sized soak: 10,000 calls from 32 threads, 1 % answered 503.

The full 100,000-call run is ``.venv/bin/python tests/soak.py``; both run
``soak.run`` and check the same things (see its docstring). This test takes
about 5 s; ``-k "not soak"`` deselects it for a quick local run (a keyword, not
a marker, so nothing needs registering under ``--strict-markers``).
"""

from __future__ import annotations

import soak


def test_soak_10000_calls_from_32_threads() -> None:
    result = soak.run(calls=10_000, threads=32, pool_maxsize=16)
    print(result.report())  # shown with -rP: calls/s, RSS samples, counts
    assert result.failures() == []
    assert result.injected == result.server_requests // soak.FAIL_EVERY
    assert result.client_attempts == result.server_requests
