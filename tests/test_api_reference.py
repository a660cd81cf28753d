"""docs/api.md is the generated API reference, and it is current.

``python scripts/api_reference.py`` writes it from the public names (``__all__``)
of dispatchkit's public modules. These tests regenerate it in memory and fail
when the page differs, naming the command that brings it up to date.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

import dispatchkit

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "api_reference.py"
API_MD = ROOT / "docs" / "api.md"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("api_reference", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(generator: ModuleType) -> str:
    text = generator.render()
    assert isinstance(text, str)
    return text


def test_api_reference_is_current(generated: str) -> None:
    current = API_MD.read_text(encoding="utf-8") if API_MD.exists() else ""
    if current != generated:
        diff = "".join(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                generated.splitlines(keepends=True),
                "docs/api.md (now)",
                "docs/api.md (from the code)",
                n=1,
            )
        )
        pytest.fail(
            "docs/api.md is stale: run `python scripts/api_reference.py` and commit the "
            f"result\n{diff[:6000]}"
        )


def test_every_public_name_is_documented(generator: ModuleType, generated: str) -> None:
    headings = set(re.findall(r"^### `(\w+)`$", generated, re.MULTILINE))
    for module_name in generator.MODULES:
        module = importlib.import_module(module_name)
        names = generator.public_names(module)
        assert names, f"{module_name} has no public name?"
        for name in names:
            if isinstance(getattr(module, name), ModuleType):
                assert f"## `{module_name}.{name}`" in generated, name
            else:
                assert name in headings, f"{module_name}.{name} is not in docs/api.md"
    assert set(dispatchkit.__all__) - {"states"} <= headings


def test_no_private_module_path(generated: str) -> None:
    """Private modules get renamed and moved: the page names public paths only."""
    private = re.findall(r"\b(?:dispatchkit|pluggy)\.(?:\w+\.)*_(?!_)\w*", generated)
    assert not private, f"private paths in docs/api.md: {sorted(set(private))}"
    assert " at 0x" not in generated, "a repr with an address: the page would change every run"


def test_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/api.md)" in readme, "README.md's doc index does not link docs/api.md"
