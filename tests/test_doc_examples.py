"""Every ```python block in README.md and docs/ (every .md file there) runs as it is.

Each block is one test case, named ``file:line`` (the line of its opening
fence), and runs in a fresh module of its own: blocks never depend on each
other. A block whose first line starts with ``# not run`` is not run (code
that blocks, like ``app.serve(port=8000)``, needs what a test machine lacks,
or is a fragment such as a hook's signature; ``# not run: why`` says why): it
is only compiled, so that it stays valid Python.

A block must clean up after itself: it runs in a scratch directory, and fails
when it leaves a thread running (a server not stopped, an executor not shut
down) or an unclosed socket behind (a ResourceWarning).
"""

from __future__ import annotations

import gc
import linecache
import re
import sys
import textwrap
import threading
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from dispatchkit import _compat

ROOT = Path(__file__).resolve().parent.parent
NOT_RUN = "# not run"
#: How long the threads a block started may take to end once it has returned.
THREAD_GRACE = 5.0

# A ```python fence (possibly indented, e.g. in a list item) up to its closing fence.
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python(?:[ \t][^\n]*)?\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


@dataclass(frozen=True, repr=False)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    source: str

    def __repr__(self) -> str:
        return f"<Block {self.id}>"

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"

    @property
    def skipped(self) -> bool:
        first = self.source.lstrip("\n").partition("\n")[0]
        return first.strip().startswith(NOT_RUN)


def documents() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("**/*.md"))
    readme = ROOT / "README.md"
    return ([readme] if readme.is_file() else []) + docs


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(path, line, textwrap.dedent(match.group("body"))))
    return found


ALL_BLOCKS = [block for path in documents() for block in blocks(path)]
RUNNABLE = [block for block in ALL_BLOCKS if not block.skipped]
FRAGMENTS = [block for block in ALL_BLOCKS if block.skipped]


def test_examples_are_found() -> None:
    # Guard against a vacuous pass: a broken fence pattern would find nothing.
    assert RUNNABLE, "no runnable ```python block found"


def test_fragments_compile() -> None:
    for block in FRAGMENTS:
        compile(block.source, f"<{block.id}>", "exec", dont_inherit=True)


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_example_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tracebacks show the block alone, as "<docs/guide.md:42>:3" (line 3 of the block at 42).
    filename = f"<{block.id}>"
    lines = block.source.splitlines(keepends=True)
    monkeypatch.setitem(linecache.cache, filename, (len(block.source), None, lines, filename))
    code = compile(block.source, filename, "exec", dont_inherit=True)
    name = "doc_example_" + re.sub(r"\W", "_", block.id)
    module = types.ModuleType(name)
    module.__file__ = str(block.path)
    monkeypatch.setitem(sys.modules, name, module)  # so that pickle and dataclasses find it
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    # A block that uses the process's default Dispatcher gets its own, closed after it.
    monkeypatch.setattr(_compat, "_default", None)
    before = set(threading.enumerate())
    try:
        exec(code, module.__dict__)
    finally:
        if _compat._default is not None:
            _compat._default.close()
        leftovers = _threads_left(before)
        leaks = _collect_garbage(module.__dict__)
    assert not leftovers, f"{block.id} left threads running: {leftovers} (use `with`)"
    assert not leaks, f"{block.id} left resources unclosed:\n" + "\n".join(leaks)


def _threads_left(before: set[threading.Thread]) -> list[str]:
    deadline = time.monotonic() + THREAD_GRACE
    for thread in set(threading.enumerate()) - before:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sorted(t.name for t in set(threading.enumerate()) - before if t.is_alive())


def _collect_garbage(namespace: dict[str, object]) -> list[str]:
    """Drop what the block made; return the warnings and errors that raised (unclosed sockets)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unraisable: list[str] = []
        previous, sys.unraisablehook = (
            sys.unraisablehook,
            lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}"),
        )
        try:
            namespace.clear()
            gc.collect()
        finally:
            sys.unraisablehook = previous
    return [f"{w.category.__name__}: {w.message}" for w in caught] + unraisable
