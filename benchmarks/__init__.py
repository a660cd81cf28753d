"""dispatchkit's benchmark suite: connection pooling measured against every peer.

Run it from the repository root with ``python -m benchmarks`` (``--quick``
for the CI-sized run, ``--check`` to fail on a missed target); the method,
the numbers and the targets are in docs/benchmarks.md.
"""
