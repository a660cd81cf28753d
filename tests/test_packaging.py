"""Packaging metadata that must stay in step: plugin versions, pins, licenses, tool pins.

The plugins released with dispatchkit carry its version and require its minor
series (``dispatchkit>=X.Y.0,<X.Y+1``), so that a plugin is never installed
beside a dispatchkit whose hooks it was not written for. Every distribution
declares the same SPDX license and ships the same LICENSE text. The lint and
type tools are pinned exactly in the ``dev`` dependency group, and the
pre-commit hooks run those same versions.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import dispatchkit

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
#: The plugins released with dispatchkit, in step with its version.
IN_STEP = ["dispatchkit-celery", "dispatchkit-example", "dispatchkit-otel"]


def pyproject(directory: Path) -> dict[str, Any]:
    with (directory / "pyproject.toml").open("rb") as file:
        data: dict[str, Any] = tomllib.load(file)
    return data


ROOT_PROJECT = pyproject(ROOT)


def plugin_project(name: str) -> dict[str, Any]:
    project: dict[str, Any] = pyproject(ROOT / "plugins" / name)["project"]
    return project


def dispatchkit_requirement(name: str) -> Requirement:
    found = [
        Requirement(text)
        for text in plugin_project(name).get("dependencies", [])
        if Requirement(text).name == "dispatchkit"
    ]
    assert len(found) == 1, f"plugins/{name} must require dispatchkit exactly once"
    return found[0]


def test_version_is_read_from_the_package() -> None:
    assert ROOT_PROJECT["project"]["dynamic"] == ["version"]
    assert Version(dispatchkit.__version__)  # a valid PEP 440 version


@pytest.mark.parametrize("name", IN_STEP)
def test_plugin_version_is_dispatchkits(name: str) -> None:
    version = plugin_project(name)["version"]
    assert version == dispatchkit.__version__, (
        f"plugins/{name}/pyproject.toml: version {version!r}, but dispatchkit is "
        f"{dispatchkit.__version__!r}: release them together"
    )


@pytest.mark.parametrize("name", IN_STEP)
def test_plugin_requires_dispatchkits_minor_series(name: str) -> None:
    current = Version(dispatchkit.__version__)
    major, minor = current.release[:2]
    expected = f"dispatchkit>={major}.{minor}.0,<{major}.{minor + 1}"
    requirement = dispatchkit_requirement(name)
    bounds = {spec.operator: Version(spec.version) for spec in requirement.specifier}
    message = f"plugins/{name}/pyproject.toml requires {requirement}; expected {expected}"
    assert len(requirement.specifier) == 2, message
    assert set(bounds) == {">=", "<"}, message
    assert bounds[">="].release[:2] == (major, minor), message
    assert bounds[">="] <= current, message
    assert bounds["<"] == Version(f"{major}.{minor + 1}"), message
    assert requirement.specifier.contains(current, prereleases=True), message


@pytest.mark.parametrize("name", [".", *(f"plugins/{name}" for name in IN_STEP)])
def test_license_metadata(name: str) -> None:
    directory = ROOT / name
    project = pyproject(directory)["project"]
    assert project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"]
    license_text = (directory / "LICENSE").read_text(encoding="utf-8")
    assert license_text == (ROOT / "LICENSE").read_text(encoding="utf-8"), (
        f"{name}/LICENSE differs from the repository's LICENSE"
    )
    assert "BSD 3-Clause" in license_text
    assert "Copyright (c) 2026, The dispatchkit developers" in license_text
    classifiers = project["classifiers"]
    # PEP 639: the SPDX expression replaces the License :: classifiers.
    assert not [c for c in classifiers if c.startswith("License ::")]
    assert classifiers == sorted(classifiers), f"{name}: classifiers out of order"


@pytest.mark.parametrize("name", [".", *(f"plugins/{name}" for name in IN_STEP)])
def test_python_classifiers_match_requires_python(name: str) -> None:
    project = pyproject(ROOT / name)["project"]
    floor = re.fullmatch(r">=3\.(\d+)", project["requires-python"])
    assert floor is not None, project["requires-python"]
    minors = sorted(
        int(c.rpartition(".")[2])
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert minors, "no Programming Language :: Python :: 3.N classifier"
    assert minors[0] == int(floor.group(1)), "the oldest 3.N classifier is not requires-python's"
    assert minors == list(range(minors[0], minors[-1] + 1)), "a gap in the 3.N classifiers"
    assert "Programming Language :: Python :: 3 :: Only" in project["classifiers"]


def dev_pins() -> dict[str, str]:
    pins = {}
    for text in ROOT_PROJECT["dependency-groups"]["dev"]:
        requirement = Requirement(text)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"the dev group pins exactly: {text}"
        pins[requirement.name] = spec.version
    return pins


def test_dev_group_pins_the_lint_and_type_tools() -> None:
    assert {"ruff", "mypy", "pre-commit"} <= set(dev_pins())
    # The test extra (what scripts/matrix installs) leaves them to the group.
    test_extra = ROOT_PROJECT["project"]["optional-dependencies"]["test"]
    names = {Requirement(text).name for text in test_extra}
    assert not names & {"ruff", "mypy"}


def test_pre_commit_runs_the_pinned_ruff() -> None:
    config = (ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8")
    ruff = set(re.findall(r"ruff==([\w.]+)", config))
    assert ruff == {dev_pins()["ruff"]}, f".pre-commit-config.yaml pins ruff {ruff or 'nowhere'}"
    # mypy runs from the project's environment, where the dev group installed the pinned one.
    assert re.search(r"entry: \.venv/bin/mypy\b", config)
