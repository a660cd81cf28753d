"""The benchmark suite's targets, as ratios of medians measured in the same run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: Connection counts and thread counts the concurrency targets are judged at.
THREADS = 16
RTT_MS = "10"
MIB = 5.0


@dataclass(frozen=True)
class Check:
    """One target: ``measured`` compared with ``limit`` by ``op``; ``None`` when not measured."""

    name: str
    measured: float | None
    op: str  # "<=" or ">="
    limit: float
    stretch: bool = False  # reported, never failed
    unit: str = "x"

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.limit if self.op == "<=" else self.measured >= self.limit

    @property
    def status(self) -> str:
        met = self.met
        if met is None:
            return "SKIP"
        if self.stretch:
            return "met" if met else "not met"
        return "PASS" if met else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def median(matrix: dict[str, Any] | None, scheme: str, key: str) -> float | None:
    try:
        value = (matrix or {})["sequential"][scheme][key]["median"]
    except (KeyError, TypeError):
        return None
    return float(value) if value else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def evaluate(results: dict[str, Any]) -> list[Check]:
    """Every target, from a whole run's results (see ``run.py``)."""
    loop = results.get("loopback")
    checks: list[Check] = []
    for scheme in ("http", "https"):
        s = scheme.upper()
        dk = median(loop, scheme, "dk")
        pipeline = ratio(dk, median(loop, scheme, "urllib3"))
        checks += [
            Check(f"{s}: Dispatcher.call <= 1.05 x urllib3 PoolManager.request + orjson.loads",
                  pipeline, "<=", 1.05),
            Check(f"{s}: stretch, Dispatcher.call <= 1.00 x urllib3", pipeline, "<=", 1.00,
                  stretch=True),
            Check(f"{s}: >= 2.5 x faster than requests.Session",
                  ratio(median(loop, scheme, "requests"), dk), ">=", 2.5),
            Check(f"{s}: >= 1.6 x faster than httpx.Client",
                  ratio(median(loop, scheme, "httpx"), dk), ">=", 1.6),
        ]  # fmt: skip
    checks.append(
        Check("HTTPS: >= 5 x faster than urlopen per call",
              ratio(median(loop, "https", "urlopen"), median(loop, "https", "dk")), ">=", 5.0)
    )  # fmt: skip
    rtt = (results.get("rtt") or {}).get("runs", {}).get(RTT_MS)
    checks.append(
        Check(f"HTTPS, {RTT_MS} ms RTT: pooled >= 2.5 x faster than keep_alive=False",
              ratio(median(rtt, "https", "dk_new"), median(rtt, "https", "dk")), ">=", 2.5)
    )  # fmt: skip
    rows = ((loop or {}).get("concurrency", {}).get("http", {}) or {}).get(str(THREADS), {})
    dk_map, raw = rows.get("dk_map", {}), rows.get("urllib3", {})
    checks.append(
        Check(f"{THREADS} threads: map >= 0.9 x the calls/s of urllib3 with the same pool size",
              ratio(dk_map.get("median"), raw.get("median")), ">=", 0.9)
    )  # fmt: skip
    opened = dk_map.get("connections") if dk_map.get("median") else None
    checks.append(
        Check(f"{THREADS} threads: connections map opened <= pool size (no discarding churn)",
              None if opened is None else float(opened), "<=", float(THREADS), unit="")
    )  # fmt: skip
    for scheme, mem in sorted((results.get("memory") or {}).items()):
        checks.append(
            Check(f"memory, {scheme.upper()}: peak RSS of {mem.get('many', '?')} calls within "
                  f"{MIB:g} MiB of {mem.get('few', '?')}", mem.get("growth_mib"), "<=", MIB,
                  unit=" MiB")
        )  # fmt: skip
    return checks
