"""What every ``dispatchkit`` command writes to stderr: its notes and its errors, one way."""

from __future__ import annotations

import sys

from dispatchkit.exceptions import DispatchError, RemoteExecuteError

__all__ = ["describe", "say"]


def say(text: str) -> None:
    """One line on stderr, after the program's name."""
    print(f"dispatchkit: {text}", file=sys.stderr, flush=True)


def describe(exc: DispatchError) -> str:
    """``ErrorType: message``, with the HTTP status of a task's failure when it has one."""
    name = type(exc).__name__
    if isinstance(exc, RemoteExecuteError) and exc.status is not None:
        name += f" (HTTP {exc.status})"
    return f"{name}: {exc}"
