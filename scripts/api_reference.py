"""Write docs/api.md: every public name of dispatchkit, with its signature and docstring.

    python scripts/api_reference.py            # rewrite docs/api.md
    python scripts/api_reference.py --check    # exit 1 when docs/api.md is stale

The public names of a module are its ``__all__`` (for a module without one,
such as ``dispatchkit.hookspecs``: what it defines whose name has no leading
underscore). Each object is documented once, under the public module that
defines it, or else the first one below that exports it; everything is named
by its public path, never by the private module it lives in, so that moving
code between private modules changes nothing here. tests/test_api_reference.py
fails when docs/api.md differs from what this script writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "api.md"
COMMAND = "python scripts/api_reference.py"

#: The public modules, in the order of the page.
MODULES = [
    "dispatchkit",
    "dispatchkit.exceptions",
    "dispatchkit.states",
    "dispatchkit.hookspecs",
    "dispatchkit.server",
    "dispatchkit.signing",
]
#: How the names of the package itself are grouped; a name not listed goes under "Other".
GROUPS = {
    "Calling": ["Dispatcher", "Settings", "default_dispatcher", "__version__"],
    "Asynchronous calls": ["AsyncResult", "Result", "Call", "states"],
    "Celery's older API": ["URL", "HttpDispatchTask"],
    "Endpoint isolation": ["Endpoints", "EndpointState", "EndpointGuard", "Admission", "Verdict"],
    "What plugins see and provide": [
        "hookimpl",
        "mask_url",
        "Request",
        "Response",
        "Envelope",
        "Outcome",
        "PluginInfo",
        "Transport",
        "Codec",
        "Executor",
    ],
}
#: Names a module without ``__all__`` never counts as its own.
NOT_PUBLIC = {"annotations", "TYPE_CHECKING"}
#: A dotted path through a private module (``dispatchkit._models.``, ``pluggy._hooks.``).
PRIVATE_PATH = re.compile(r"\b(?:[A-Za-z]\w*\.)*_\w+\.")
#: A reST role: :class:`~dispatchkit.Call`, :func:`x`, :meth:`Dispatcher.call`.
ROLE = re.compile(r":(?:py:)?\w+:`(~?)([^`]+)`")
#: An object's repr that would differ from run to run.
ADDRESS = re.compile(r" at 0x[0-9a-f]+")


# -- what is public ------------------------------------------------------------------------


def public_names(module: types.ModuleType) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_") or name in NOT_PUBLIC or isinstance(obj, types.ModuleType):
            continue
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ != module.__name__:
            continue  # imported, not defined here
        names.append(name)
    return names


def home(obj: object, name: str, modules: dict[str, types.ModuleType]) -> str:
    """The public module an object is documented under."""
    defined = getattr(obj, "__module__", None)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and defined in modules:
        return str(defined)
    return next(m for m, module in modules.items() if name in public_names(module))


# -- text ----------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """The anchor GitHub makes of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def markdown(doc: str | None) -> str:
    """A docstring as Markdown: roles and ``literals`` as code, fields as a list."""
    if not doc:
        return ""
    text = inspect.cleandoc(doc)
    text = ROLE.sub(_role, text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"^:param (\w+):", r"- `\1`:", text, flags=re.MULTILINE)
    text = re.sub(r"^:raises (\w+):", r"- raises `\1`:", text, flags=re.MULTILINE)
    text = re.sub(r"^:returns?:", "- returns:", text, flags=re.MULTILINE)
    text = re.sub(r"::$", ":", text, flags=re.MULTILINE)  # a literal block follows, indented
    return public(text)


def _role(match: re.Match[str]) -> str:
    """:class:`~a.b.C` as `C`, :func:`a.f` as `a.f`."""
    target = match.group(2)
    return f"`{target.rpartition('.')[2] if match.group(1) else target}`"


def public(text: str) -> str:
    """``text`` without private module paths: ``dispatchkit._models.Call`` becomes ``Call``."""
    return ADDRESS.sub("", PRIVATE_PATH.sub("", text))


def annotation(value: Any) -> str:
    # `from __future__ import annotations` keeps annotations as their source text.
    return value if isinstance(value, str) else inspect.formatannotation(value)


def value_repr(value: object) -> str:
    if isinstance(value, (frozenset, set)):
        items = ", ".join(sorted(repr(v) for v in value))
        return f"{type(value).__name__}({{{items}}})"
    return public(repr(value))


def parameters(func: Callable[..., Any], *, skip_self: bool = False) -> str:
    """``(a: int, /, b: str = 'x', *, c: bool = False) -> R`` with the annotations as written."""
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    if skip_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    out: list[str] = []
    positional_only = star = False
    for param in params:
        if param.name.startswith("_"):
            continue  # a private field of a dataclass
        kind = param.kind
        if positional_only and kind is not inspect.Parameter.POSITIONAL_ONLY:
            out.append("/")
            positional_only = False
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            positional_only = True
        if kind is inspect.Parameter.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        text = param.name
        if kind is inspect.Parameter.VAR_POSITIONAL:
            text, star = f"*{text}", True
        elif kind is inspect.Parameter.VAR_KEYWORD:
            text = f"**{text}"
        if param.annotation is not inspect.Parameter.empty:
            text += f": {annotation(param.annotation)}"
        if param.default is not inspect.Parameter.empty:
            text += f" = {value_repr(param.default)}"
        out.append(text)
    if positional_only:
        out.append("/")
    result = f"({', '.join(out)})"
    if sig.return_annotation not in (inspect.Signature.empty, None, "None"):
        result += f" -> {annotation(sig.return_annotation)}"
    return public(result)


def code(line: str) -> str:
    return f"```py\n{line}\n```"


# -- objects -------------------------------------------------------------------------------


def own_constructor(cls: type) -> bool:
    """Whether the class's ``__init__``/``__new__`` is dispatchkit's (not object's, typing's)."""
    for klass in cls.__mro__:
        if "__init__" in vars(klass) or "__new__" in vars(klass):
            return klass.__module__.split(".")[0] == "dispatchkit" and not getattr(
                cls, "_is_protocol", False
            )
    return False


def bases(cls: type) -> list[str]:
    shown = []
    for base in cls.__bases__:
        if base is object:
            continue
        if base.__module__ == "builtins":
            shown.append(base.__name__)
        elif base.__module__ == "typing":
            shown.append(base.__name__)  # Protocol
        else:
            shown.append(base.__qualname__)
    return shown


def members(cls: type) -> Iterator[tuple[str, str, str]]:
    """(name, signature line, docstring) of the public members the class defines itself."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for name, member in vars(cls).items():
        if name.startswith("_") or name in fields:
            continue
        if isinstance(member, property):
            hint = member.fget.__annotations__.get("return") if member.fget else None
            kind = f": {annotation(hint)}" if hint else ""
            yield name, public(f"{cls.__name__}.{name}{kind}"), markdown(member.__doc__)
        elif isinstance(member, (classmethod, staticmethod)):
            func = member.__func__
            prefix = "classmethod " if isinstance(member, classmethod) else "staticmethod "
            line = f"{prefix}{cls.__name__}.{name}{parameters(func, skip_self=True)}"
            yield name, line, markdown(func.__doc__)
        elif inspect.isfunction(member):
            line = f"{cls.__name__}.{name}{parameters(member, skip_self=True)}"
            yield name, line, markdown(member.__doc__)
        elif inspect.ismemberdescriptor(member) or inspect.isgetsetdescriptor(member):
            hint = vars(cls).get("__annotations__", {}).get(name)  # a __slots__ attribute
            kind = f": {annotation(hint)}" if hint else ""
            yield name, public(f"{cls.__name__}.{name}{kind}"), ""
        elif not callable(member):
            yield name, f"{cls.__name__}.{name} = {value_repr(member)}", ""


def comment_doc(module: types.ModuleType, name: str) -> tuple[str, str]:
    """A module constant's ``#:`` comment and the source text of its assignment, if found."""
    try:
        lines = inspect.getsource(module).splitlines()
    except (OSError, TypeError):
        return "", ""
    for number, line in enumerate(lines):
        if re.match(rf"{re.escape(name)}(: [^=]+)? = ", line):
            comments: list[str] = []
            for before in reversed(lines[:number]):
                if not before.startswith("#:"):
                    break
                comments.insert(0, before[2:].strip())
            return markdown(" ".join(comments)), line
    return "", ""


def alias_doc(name: str) -> str:
    """The ``#:`` comment of a type alias, from the dispatchkit module that assigns it."""
    for module_name, module in sorted(sys.modules.items()):
        if module_name.startswith("dispatchkit.") and module is not None:
            doc, source = comment_doc(module, name)
            if source:
                return doc
    return ""


def describe(name: str, obj: object, module: types.ModuleType) -> str:
    """The section of one public object, headed ``### `name` ``."""
    parts = [f"### `{name}`", ""]
    if inspect.isclass(obj):
        line = f"class {name}"
        if own_constructor(obj):
            line += parameters(obj).removesuffix(" -> None")
        shown = bases(obj)
        parts += [code(line), ""]
        if shown:
            parts += [f"Bases: {', '.join(f'`{b}`' for b in shown)}.", ""]
        if doc := markdown(obj.__doc__):
            parts += [doc, ""]
        for _, signature, doc in members(obj):
            parts += [f"**`{signature}`**", ""]
            if doc:
                parts += [doc, ""]
    elif inspect.isfunction(obj):
        parts += [code(f"def {name}{parameters(obj)}"), ""]
        if doc := markdown(obj.__doc__):
            parts += [doc, ""]
    elif typing.get_origin(obj) is not None:  # a type alias: Literal[...], X | Y
        parts += [code(f"{name} = {public(repr(obj)).replace('typing.', '')}"), ""]
        if doc := alias_doc(name):
            parts += [doc, ""]
    else:
        doc, source = comment_doc(module, name)
        if isinstance(obj, (str, int, float, bool, bytes, frozenset, set)) or not source:
            line = f"{name} = {value_repr(obj)}"
            kind = type(obj)
            if kind.__module__ not in ("builtins", module.__name__) and not source:
                package = kind.__module__.split(".")[0]
                exported = getattr(sys.modules.get(package), kind.__name__, None) is kind
                prefix = f"{package}." if exported else ""
                line = f"{name}: {prefix}{kind.__qualname__}"
                doc = doc or markdown((kind.__doc__ or "").split("\n\n")[0])
        else:
            line = public(source)
        parts += [code(line), ""]
        if doc:
            parts += [doc, ""]
    return "\n".join(parts)


def module_doc(module: types.ModuleType) -> str:
    """The first paragraph of a module's docstring."""
    return markdown((module.__doc__ or "").strip().split("\n\n")[0])


# -- the page ------------------------------------------------------------------------------


def render() -> str:
    modules = {name: importlib.import_module(name) for name in MODULES}
    documented: dict[int, tuple[str, str]] = {}  # id(obj) -> (module, name)
    for module_name, module in modules.items():
        for name in public_names(module):
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) or id(obj) in documented:
                continue
            if home(obj, name, modules) == module_name:
                documented[id(obj)] = (module_name, name)

    out = [
        "# API reference",
        "",
        f"<!-- generated by {COMMAND}; do not edit by hand -->",
        "",
        "Every public name of dispatchkit (the `__all__` of each module below) with",
        f"its signature and docstring, generated from the code by `{COMMAND}`:",
        "`tests/test_api_reference.py` fails when this page is stale. What each error",
        "means for a call is in [protocol.md](protocol.md#errors); how the hooks are",
        "used is in [plugins.md](plugins.md).",
        "",
    ]
    out += [f"- [`{m}`](#{slug(m)}): {module_doc(modules[m])}" for m in MODULES]
    out.append("")
    for module_name, module in modules.items():
        out += [f"## `{module_name}`", ""]
        if doc := module_doc(module):
            out += [doc, ""]
        names = public_names(module)
        mine = [n for n in names if documented.get(id(getattr(module, n))) == (module_name, n)]
        elsewhere = [n for n in names if n not in mine]
        if module_name == "dispatchkit":
            grouped = [n for group in GROUPS.values() for n in group]
            other = [n for n in mine if n not in grouped]
            groups = {**GROUPS, "Other": other} if other else dict(GROUPS)
            for title, group in groups.items():
                links = ", ".join(f"[`{n}`](#{slug(n)})" for n in group if n in names)
                out.append(f"- {title}: {links}")
            out.append("")
            order = [n for group in groups.values() for n in group if n in mine]
        else:
            order = sorted(mine, key=lambda n: source_line(module, getattr(module, n), n))
        for name in order:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                continue
            out.append(describe(name, obj, module))
        if elsewhere:
            others: list[str] = []
            for name in elsewhere:
                obj = getattr(module, name)
                if isinstance(obj, types.ModuleType):
                    others.append(f"[`{name}`](#{slug(obj.__name__)})")
                else:
                    _, shown = documented[id(obj)]
                    others.append(f"[`{name}`](#{slug(shown)})")
            what = "Also exported here" if module_name != "dispatchkit" else "Also exported"
            out += [f"{what}, documented with their own module: {', '.join(others)}.", ""]
    text = "\n".join(out).rstrip("\n") + "\n"
    if re.search(r"\bdispatchkit\.(?:\w+\.)*_(?!_)\w", text):
        raise AssertionError("a private module path made it into the API reference")
    return text


def source_line(module: types.ModuleType, obj: object, name: str) -> int:
    if inspect.isclass(obj) or inspect.isfunction(obj):
        try:
            return inspect.getsourcelines(obj)[1]
        except (OSError, TypeError):
            return 0
    try:
        lines = inspect.getsource(module).splitlines()
    except (OSError, TypeError):
        return 0
    pattern = re.compile(rf"{re.escape(name)}(: [^=]+)? = ")
    return next((n for n, line in enumerate(lines, 1) if pattern.match(line)), 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.partition("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when docs/api.md is stale"
    )
    args = parser.parse_args(argv)
    text = render()
    current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
    if args.check:
        if current != text:
            print(f"docs/api.md is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if current != text:
        OUTPUT.write_text(text, encoding="utf-8")
        print("rewrote docs/api.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
