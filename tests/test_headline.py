"""The benchmark figures in README.md and docs/benchmarks.md come from one run.

``python -m benchmarks.headline`` writes the blocks between
``<!-- NAME:begin ... -->`` and ``<!-- NAME:end -->`` from
docs/benchmark-results.json (the ``benchmarks.json`` of one full run). These
tests regenerate them in memory and fail when a document differs: a figure
edited by hand, or a new results file whose blocks were not rewritten.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmark-results.json"


@pytest.fixture
def headline(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import headline

    return headline


def test_results_file_is_one_full_run() -> None:
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    meta = results["meta"]
    assert meta["mode"] == "full", "docs/benchmark-results.json must be a full run's"
    assert meta.get("commit"), "the results file does not say which commit it measured"
    assert results["rtt"]["runs"], "a full run measures the RTT part too (run it as root)"
    assert results["checks"], "no target in the results file"


@pytest.mark.parametrize("document", ["README.md", "docs/benchmarks.md"])
def test_generated_blocks_are_current(headline: ModuleType, document: str) -> None:
    text = (ROOT / document).read_text(encoding="utf-8")
    expected = headline.rewrite(text, document, headline.load())
    if expected != text:
        diff = "".join(
            difflib.unified_diff(
                text.splitlines(keepends=True),
                expected.splitlines(keepends=True),
                f"{document} (now)",
                f"{document} (from docs/benchmark-results.json)",
            )
        )
        pytest.fail(
            f"{document}: the benchmark figures differ from docs/benchmark-results.json; "
            f"run `python -m benchmarks.headline` (never edit the blocks by hand)\n{diff}"
        )


def test_every_document_holds_its_blocks(headline: ModuleType) -> None:
    for document, names in headline.DOCUMENTS.items():
        text = (ROOT / document).read_text(encoding="utf-8")
        found = [match.group("name") for match in headline.BLOCK.finditer(text)]
        assert found == list(names), f"{document}: blocks {found}, expected {list(names)}"
    assert "headline" in headline.DOCUMENTS["README.md"]


def test_a_hand_edit_is_caught(headline: ModuleType) -> None:
    """Guard against a vacuous pass: a changed figure makes the document stale."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    run = headline.load()
    block = headline.headline(run, "README.md")
    assert block in text
    edited = text.replace(block, block.replace("faster", "quicker", 1))
    assert headline.rewrite(edited, "README.md", run) == text
    with pytest.raises(headline.Stale):
        headline.rewrite(text.replace("<!-- headline:end -->", ""), "README.md", run)


def _async_run(headline: ModuleType) -> Any:
    def rows(dk_async: float, httpx: dict[str, Any]) -> dict[str, Any]:
        return {
            "aiohttp": {"median": 1000.0, "cpu_median": 100.0},
            "dk_async": {"median": dk_async, "cpu_median": 110.0},
            "dk_map": {"median": 300.0},
            "httpx_async": httpx,
        }

    results = {
        "meta": {"mode": "full", "started": "2026-12-01T10:00:00", "commit": "abc1234"},
        "loopback": {
            "delay_ms": 50,
            "concurrency": {"http": {"64": rows(950.0, {"median": 200.0}),
                                     "1024": rows(1040.0, {"median": None, "error": "x"})}},
            "delayed": {"http": {"64": rows(980.0, {"median": 100.0})}},
        },
        "memory_in_flight": {"in_flight": 1000, "growth_mib": {"aiohttp": 14.0, "dk_async": 15.4}},
    }  # fmt: skip
    return headline.Run(results)


def test_asyncio_figures_come_from_the_results(headline: ModuleType) -> None:
    run = _async_run(headline)
    text = headline.asyncio_finding(run)
    assert "0.95\N{EN DASH}1.04 \N{MULTIPLICATION SIGN} its calls/s at the fast endpoint" in text
    assert "(64 to 1,024 in flight)" in text
    assert "0.98 \N{MULTIPLICATION SIGN} at the endpoint that answers 50 ms late" in text
    assert "1.10 \N{MULTIPLICATION SIGN} its CPU time per call" in text
    assert "3.17\N{EN DASH}3.47 \N{MULTIPLICATION SIGN} the calls/s" in text  # over the sync map
    assert "did not finish at 1,024 in flight" in text  # httpx, as it did
    assert "grew by 15.4 MiB, aiohttp's by 14.0 MiB" in text
    assert "AsyncDispatcher.map" in headline.headline(run, "README.md")
    standing = headline.standing(run, "docs/benchmarks.md")
    # Over the sync map, the why is the baseline's own ratio, from the same run.
    assert "hand-written aiohttp itself does 3.33 \N{MULTIPLICATION SIGN} `Dispatcher.map`" in (
        standing
    )


def test_no_asyncio_figures_without_asyncio_results(headline: ModuleType) -> None:
    """A results file from before the asyncio clients says nothing about them."""
    run = headline.Run({"meta": {}, "loopback": {"concurrency": {"http": {"16": {}}}}})
    assert headline.asyncio_finding(run) == ""
    assert "AsyncDispatcher" not in headline.headline(run, "README.md")
