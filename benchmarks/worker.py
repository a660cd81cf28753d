"""Run the client matrix in this process and print it as JSON: the RTT runs' child.

``ip netns exec <client-ns> python -m benchmarks.worker < plan.json`` (the
parent does this): reads a :class:`benchmarks.measure.Plan` as JSON on stdin,
prints the results as one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import json
import sys

from benchmarks.measure import Plan, run_matrix


def main() -> None:
    plan = Plan(**json.load(sys.stdin))
    json.dump(run_matrix(plan), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
