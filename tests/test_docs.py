"""The plugin guide (docs/plugins.md) keeps up with the hook specifications.

Every hook in :mod:`dispatchkit.hookspecs` must be documented with its exact
signature, every ``python`` block must compile, and the example plugin's hooks
must be shown as they are in ``plugins/dispatchkit-example``.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dispatchkit_example
import pytest

from dispatchkit import hookspecs

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_MD = ROOT / "docs" / "plugins.md"
EXAMPLE_PYPROJECT = ROOT / "plugins" / "dispatchkit-example" / "pyproject.toml"

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def hooks() -> dict[str, Callable[..., Any]]:
    return {
        name: obj
        for name, obj in vars(hookspecs).items()
        if name.startswith("dispatchkit_") and inspect.isfunction(obj)
    }


def _annotation(annotation: Any) -> str:
    # `from __future__ import annotations` keeps annotations as the source text.
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def signature_line(name: str, func: Callable[..., Any]) -> str:
    """``def name(param: Ann, ...) -> Ret``, as the spec declares it."""
    sig = inspect.signature(func)
    params = []
    for param in sig.parameters.values():
        assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name}) untyped"
        text = f"{param.name}: {_annotation(param.annotation)}"
        if param.default is not inspect.Parameter.empty:
            text += f" = {param.default!r}"
        params.append(text)
    assert sig.return_annotation is not inspect.Signature.empty, f"{name} has no return type"
    return f"def {name}({', '.join(params)}) -> {_annotation(sig.return_annotation)}"


@pytest.fixture(scope="module")
def guide() -> str:
    return PLUGINS_MD.read_text(encoding="utf-8")


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def test_hookspecs_are_found() -> None:
    # Guard against a vacuous pass: the specs must be there to be checked.
    assert {"dispatchkit_configure", "dispatchkit_transport", "dispatchkit_call_done"} <= set(
        hooks()
    )


@pytest.mark.parametrize("name", sorted(hooks()))
def test_hook_is_documented_with_its_exact_signature(name: str, guide: str) -> None:
    expected = signature_line(name, hooks()[name])
    # The whole line, up to the colon that opens the body: "-> X" must not pass for "-> X | None".
    assert re.search(rf"^{re.escape(expected)}:", guide, re.MULTILINE), (
        f"docs/plugins.md lacks the signature line:\n    {expected}: ..."
    )
    assert re.search(rf"^#+ .*`{name}`", guide, re.MULTILINE), f"no section heading for {name}"


def test_documented_hooks_exist(guide: str) -> None:
    """A hook named in the guide's code at module level is a real hook (no stale names)."""
    named = set(re.findall(r"^def (dispatchkit_\w+)\(", guide, re.MULTILINE))
    assert named, "no hook signature found in docs/plugins.md"
    assert named <= set(hooks()), f"not hooks: {sorted(named - set(hooks()))}"


def test_python_blocks_compile(guide: str) -> None:
    blocks = code_blocks(guide, "python")
    assert len(blocks) >= len(hooks())
    for number, block in enumerate(blocks, 1):
        try:
            compile(block, f"docs/plugins.md python block {number}", "exec")
        except SyntaxError as exc:
            pytest.fail(f"python block {number} does not compile: {exc}\n{block}")


def example_hook_methods() -> dict[str, Callable[..., Any]]:
    marker = f"{hookspecs.PROJECT}_impl"  # where pluggy's HookimplMarker records its options
    return {
        name: member
        for name, member in vars(dispatchkit_example.ExamplePlugin).items()
        if callable(member) and hasattr(member, marker)
    }


def test_example_plugin_hooks_are_documented(guide: str) -> None:
    methods = example_hook_methods()
    assert methods, "the example plugin implements no hook?"
    blocks = "\n".join(code_blocks(guide, "python"))
    for name, method in methods.items():
        assert name in hooks(), f"example plugin implements an unknown hook {name}"
        # The documented example is the real one: each hook method's source, verbatim.
        source = inspect.getsource(method)
        assert source in blocks, f"docs/plugins.md does not show ExamplePlugin.{name} as it is"


def test_example_entry_point_is_documented(guide: str) -> None:
    pyproject = EXAMPLE_PYPROJECT.read_text(encoding="utf-8")
    section = re.search(r"^\[project\.entry-points\.dispatchkit\]\n(.+?)$", pyproject, re.M)
    assert section is not None, "the example plugin declares no dispatchkit entry point"
    toml = "\n".join(code_blocks(guide, "toml"))
    assert "[project.entry-points.dispatchkit]" in toml
    assert section.group(1) in toml


# -- the docs as a whole ---------------------------------------------------------------

PROTOCOL_MD = ROOT / "docs" / "protocol.md"
#: A reference to a design document or an issue tracker that is not in the repository.
OUTSIDE_REFERENCE = re.compile(r"DESIGN(\.md| §| section)|\bissue \d+", re.IGNORECASE)


def test_the_error_table_names_every_error_under_its_parent() -> None:
    """docs/protocol.md holds the one error table: every error, each under its base class."""
    from dispatchkit import exceptions

    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = re.search(r"^## Errors\n(.*?)^## ", text, re.MULTILINE | re.DOTALL)
    assert section is not None, "docs/protocol.md has no '## Errors' section"
    block = re.search(r"^    DispatchError\n(?:    .+\n)*", section.group(1), re.MULTILINE)
    assert block is not None, "no hierarchy tree (from DispatchError) in docs/protocol.md"
    tree = re.findall(r"^    ([│├└─ ]*)(\w+)", block.group(0), re.MULTILINE)
    assert tree, "no hierarchy tree in docs/protocol.md's Errors section"
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for prefix, name in tree:
        depth = len(prefix) // 4
        del stack[depth:]
        parents[name] = stack[-1] if stack else None
        stack.append(name)
    errors = {
        name: obj
        for name in exceptions.__all__
        if isinstance(obj := getattr(exceptions, name), type) and issubclass(obj, Exception)
    }
    assert set(parents) == set(errors), (
        f"docs/protocol.md's tree lacks {sorted(set(errors) - set(parents))}, "
        f"names unknown {sorted(set(parents) - set(errors))}"
    )
    for name, parent in parents.items():
        bases = [base.__name__ for base in errors[name].__bases__]
        assert (parent or "Exception") in bases, f"{name} is shown under {parent}, not {bases}"


def repository_text_files() -> list[Path]:
    """The files git tracks or would track (not ignored), that exist and hold text."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git work tree: {exc}")
    found = []
    for name in sorted(set(listed.decode().split("\0")) - {""}):
        path = ROOT / name
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            found.append(path)
    return found


def test_no_reference_to_documents_outside_the_repository() -> None:
    """Docs, code and tests cite nothing a reader of the repository cannot open."""
    files = repository_text_files()
    assert ROOT / "README.md" in files, "git ls-files found no README.md?"
    hits = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                hits.append(f"{path.relative_to(ROOT).as_posix()}:{number}: {line.strip()[:120]}")
    assert not hits, (
        "references to a design document or an issue outside the repository (say what is "
        "meant, or link a file in the repository):\n" + "\n".join(hits)
    )
