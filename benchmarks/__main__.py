"""``python -m benchmarks``: see :mod:`benchmarks.run`."""

from __future__ import annotations

import sys

from benchmarks.run import main

try:
    status = main()
except KeyboardInterrupt:
    # Every finally has run by now: servers stopped, namespaces removed.
    print("\ninterrupted: servers stopped, namespaces removed", file=sys.stderr)
    status = 130
raise SystemExit(status)
