"""The benchmark suite keeps working: its tiniest run end to end, and its target logic.

No timing is asserted here (speed is the suite's own report, never a test
result); these tests only make sure that ``python -m benchmarks`` cannot rot.
Peers that are not installed (requests, httpx, matplotlib come with the
``bench`` extra) are left out by the suite itself.
"""

from __future__ import annotations

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
    assert results["memory"]["http"]["growth_mib"] is not None
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
