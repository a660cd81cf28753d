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
