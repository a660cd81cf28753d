"""What every ``dispatchkit`` command writes to stderr: its notes and its errors, one way."""

from __future__ import annotations

import json
import sys
from typing import Any

import orjson

from dispatchkit.exceptions import DispatchError, RemoteExecuteError

__all__ = ["describe", "json_bytes", "say"]


def say(text: str) -> None:
    """One line on stderr, after the program's name."""
    print(f"dispatchkit: {text}", file=sys.stderr, flush=True)


def describe(exc: DispatchError) -> str:
    """``ErrorType: message``, with the HTTP status of a task's failure when it has one."""
    name = type(exc).__name__
    if isinstance(exc, RemoteExecuteError) and exc.status is not None:
        name += f" (HTTP {exc.status})"
    return f"{name}: {exc}"


def json_bytes(value: Any, *, indent: bool = False) -> bytes:
    """``value`` as JSON, for stdout: orjson, else the standard library's encoder.

    orjson writes at most 254 levels of nesting (and integers of 64 bits); an
    answer may hold more (orjson reads 1,024). What neither can write is a
    :class:`~dispatchkit.DispatchError`. A value JSON cannot hold (a codec
    plugin's) is shown as its ``str``.
    """
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    try:
        return orjson.dumps(value, option=option, default=str)
    except orjson.JSONEncodeError:
        pass
    try:
        text = json.dumps(
            value, default=str, ensure_ascii=False, indent=2 if indent else None,
            separators=None if indent else (",", ":"),
        )  # fmt: skip
    except (RecursionError, ValueError) as exc:
        raise DispatchError(f"cannot write the value as JSON: {exc}") from None
    return text.encode("utf-8", "surrogatepass")
