"""The benchmark suite keeps working: its tiniest run end to end, and its target logic.

No timing is asserted here (speed is the suite's own report, never a test
result); these tests only make sure that ``python -m benchmarks`` cannot rot.
Peers that are not installed (requests, httpx, matplotlib come with the
``bench`` extra) are left out by the suite itself.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_measures_every_installed_client(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--no-netns", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Sequential GET" in done.stdout
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    assert results["meta"]["versions"]["dispatchkit"]
    for scheme in ("http", "https"):
        rows = results["loopback"]["sequential"][scheme]
        for key in ("raw", "urllib3", "dk", "dk_new", "urlopen"):
            assert rows[key]["error"] is None, (scheme, key, rows[key]["error"])
            assert rows[key]["median"] > 0
        # Counted by the target server: pooling reuses one connection, keep_alive=False never.
        assert rows["dk"]["connections"] <= 1
        assert rows["dk_new"]["connections"] == rows["dk_new"]["total_calls"]
    threads = results["loopback"]["concurrency"]["http"]["4"]
    assert threads["dk_map"]["connections"] <= 4
    # The asyncio clients, next to the threaded ones, at the fast and the delayed endpoint.
    have_httpx = importlib.util.find_spec("httpx") is not None  # the bench extra
    for section in ("concurrency", "delayed"):
        rows = results["loopback"][section]["http"]["4"]
        assert ("httpx_async" in rows) == have_httpx, sorted(rows)
        for key in ("dk_map", "aiohttp", "dk_async", *(["httpx_async"] if have_httpx else [])):
            assert rows[key]["error"] is None, (section, key, rows[key]["error"])
            assert rows[key]["median"] > 0
            assert rows[key]["cpu_median"] > 0
        assert rows["dk_async"]["connections"] <= 4
        assert rows["aiohttp"]["connections"] <= 4
    assert "1" not in results["loopback"]["delayed"]["http"]  # only the levels asked for
    assert results["memory"]["http"]["growth_mib"] is not None
    in_flight = results["memory_in_flight"]
    assert set(in_flight["growth_mib"]) == {"aiohttp", "dk_async"}, in_flight
    names = [c["name"] for c in results["checks"]]
    assert f"fast, 4 in flight: {CALLS}" in names
    assert {c["status"] for c in results["checks"]} <= {"PASS", "FAIL", "SKIP", "met", "not met"}


def _results(dk: float, urllib3: float) -> dict[str, Any]:
    rows = {"dk": {"median": dk}, "urllib3": {"median": urllib3}}
    return {"loopback": {"sequential": {"http": rows}}}


@pytest.mark.parametrize(("dk", "status"), [(100.0, "PASS"), (106.0, "FAIL")])
def test_targets_are_ratios_of_medians(
    monkeypatch: pytest.MonkeyPatch, dk: float, status: str
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.checks import evaluate

    found = {c.name: c for c in evaluate(_results(dk, 100.0))}
    check = found["HTTP: Dispatcher.call <= 1.05 x urllib3 PoolManager.request + orjson.loads"]
    assert check.status == status
    assert found["HTTPS: >= 5 x faster than urlopen per call"].status == "SKIP"


def _level(**rows: dict[str, float]) -> dict[str, Any]:
    return {"4": rows}


def _async(fast: dict[str, Any], delayed: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"loopback": {"delay_ms": 50, "concurrency": {"http": fast},
                         "delayed": {"http": delayed or {}}}}  # fmt: skip


def _found(monkeypatch: pytest.MonkeyPatch, results: dict[str, Any]) -> dict[str, Any]:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.checks import evaluate

    return {c.name: c for c in evaluate(results)}


CALLS = "AsyncDispatcher.map >= 0.90 x aiohttp's calls/s"
CPU = "AsyncDispatcher.map CPU/call <= 1.15 x aiohttp's"
OVER_SYNC = "AsyncDispatcher.map >= 2.5 x Dispatcher.map's calls/s"
OVER_SYNC_CPU = "AsyncDispatcher.map CPU/call <= 0.85 x Dispatcher.map's"


@pytest.mark.parametrize(
    ("calls", "cpu", "status"),
    [(950.0, 110.0, ("PASS", "PASS")), (850.0, 120.0, ("FAIL", "FAIL"))],
)
def test_async_targets_are_ratios_to_aiohttp(
    monkeypatch: pytest.MonkeyPatch, calls: float, cpu: float, status: tuple[str, str]
) -> None:
    rows = _level(
        aiohttp={"median": 1000.0, "cpu_median": 100.0},
        dk_async={"median": calls, "cpu_median": cpu},
    )
    found = _found(monkeypatch, _async(rows))
    assert found[f"fast, 4 in flight: {CALLS}"].status == status[0]
    assert found[f"fast, 4 in flight: {CPU}"].status == status[1]
    # Nothing measured at the delayed endpoint: one SKIP row per target, not one per level.
    skipped = [name for name, c in found.items() if name.startswith("50 ms")]
    assert len(skipped) == 2
    assert all(found[name].status == "SKIP" for name in skipped)


def test_async_dispatcher_failing_where_aiohttp_ran_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {"64": {"aiohttp": {"median": 1000.0, "cpu_median": 100.0},
                   "dk_map": {"median": 300.0},
                   "dk_async": {"median": None, "error": "BatchTimeout: ..."}}}  # fmt: skip
    found = _found(monkeypatch, _async(rows))
    check = found[f"fast, 64 in flight: {CALLS}"]
    assert (check.measured, check.status) == (0.0, "FAIL")
    assert found[f"fast, 64 in flight: {CPU}"].status == "SKIP"
    assert found[f"fast, 64 in flight: {OVER_SYNC}"].status == "not met"  # reported only
    assert found[f"fast, 64 in flight: {OVER_SYNC_CPU}"].status == "SKIP"


@pytest.mark.parametrize(("cpu", "status"), [(84.0, "PASS"), (86.0, "FAIL")])
def test_asyncio_against_threads_is_judged_on_cpu_per_call(
    monkeypatch: pytest.MonkeyPatch, cpu: float, status: str
) -> None:
    rows = {"256": {"aiohttp": {"median": 1000.0, "cpu_median": 60.0},
                    "dk_map": {"median": 800.0, "cpu_median": 100.0},
                    "dk_async": {"median": 950.0, "cpu_median": cpu}}}  # fmt: skip
    found = _found(monkeypatch, _async(rows))
    assert found[f"fast, 256 in flight: {OVER_SYNC_CPU}"].status == status
    over = found[f"fast, 256 in flight: {OVER_SYNC}"]
    assert (over.measured, over.status) == (950.0 / 800.0, "not met")


@pytest.mark.parametrize(("ours", "status"), [(11.9, "PASS"), (12.1, "FAIL")])
def test_in_flight_memory_target(monkeypatch: pytest.MonkeyPatch, ours: float, status: str) -> None:
    results = {"memory_in_flight": {"in_flight": 1000, "delay_ms": 50,
                                    "growth_mib": {"aiohttp": 10.0, "dk_async": ours}}}  # fmt: skip
    found = _found(monkeypatch, results)
    name = "memory, 1,000 in flight (50 ms): AsyncDispatcher's RSS growth <= 1.2 x aiohttp's"
    assert found[name].status == status


def test_compare_async_runs_the_clients_side_by_side() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare_async", "--in-flight", "2", "--rounds", "2",
         "--calls", "8", "--no-gc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 in flight, /multiply, 2 rounds of 8 calls, gc off")
    assert lines[1].split()[0] == "aiohttp"
    assert "(1.000x, paired 1.000x)" in lines[1]
    assert lines[2].split()[0] == "dk_async"


@pytest.mark.parametrize(
    ("rate", "calls"),
    [
        (10_000.0, 4_000),  # fast: a sample of 0.4 s, not of the batch's 0.1 s
        (1_000_000.0, 20_000),  # never more than max_sample_calls
        (3_000.0, 1_200),
        (2_000.0, 1_000),  # the batch lasts long enough
        (200.0, 500),  # slow: fewer calls, 2.5 s
        (10.0, 64),  # never fewer than the calls in flight
    ],
)
def test_a_sample_lasts_between_its_bounds(rate: float, calls: int) -> None:
    from benchmarks.measure import Plan, sample_calls

    plan = Plan("t", {}, None, "", sample_min_s=0.4, sample_max_s=2.5, max_sample_calls=20_000)
    assert sample_calls(plan, 1_000, 64, rate) == calls
