"""Checks of what users give: numbers (settings, per-call options, server limits), and
the many calls of one method (``map``, ``submit_many``).

``bool`` is an ``int`` to Python but never a number here: ``timeout=True`` is
a mistake, not one second. Each check returns the value it accepted, and
raises :class:`~dispatchkit.UsageError` naming what was wrong.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from dispatchkit.exceptions import UsageError


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: The most seconds any duration may be (about 31 years): a socket's timeout, a sleep or
#: a Redis expiry of more overflows the platform's clock types.
MAX_SECONDS = 1e9


def seconds(value: object, what: str, *, zero: bool = False) -> float:
    """``value`` if it is a finite number of seconds, positive (or ``>= 0`` with ``zero``),
    at most :data:`MAX_SECONDS`."""
    if not _is_number(value):
        raise UsageError(f"{what} must be a number of seconds, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]  # _is_number said int or float
    except OverflowError:  # an int past any float
        number = math.inf
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        bound = ">= 0" if zero else "positive"
        raise UsageError(f"{what} must be {bound} and finite, got {_short(value)}")
    if number > MAX_SECONDS:
        raise UsageError(f"{what} must be at most {MAX_SECONDS:.0e} seconds, got {_short(value)}")
    return number


def _short(value: object) -> str:
    """``repr(value)``; an int too long for that (4,300 digits) is described instead."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    return repr(value)


def count(value: object, what: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an ``int`` within ``minimum..maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{what} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise UsageError(f"{what} must be {bound}, got {value!r}")
    return value


def each(calls: object, what: str) -> Iterator[Any]:
    """An iterator over ``calls``, the many calls a method takes: a list, a generator...

    A string, a mapping (one call's arguments, not a list of them) or anything
    not iterable is a :class:`~dispatchkit.UsageError` naming ``what``.
    """
    if isinstance(calls, (str, bytes, Mapping)):
        raise UsageError(f"{what} takes an iterable of calls, got one {type(calls).__name__}")
    return iterate(calls, f"{what} takes an iterable of calls")


def iterate(value: object, refusal: str) -> Iterator[Any]:
    """``iter(value)``; when ``value`` is not iterable, a :class:`~dispatchkit.UsageError`
    saying ``refusal`` and the type it got."""
    try:
        iterator: Iterator[Any] = iter(value)  # type: ignore[call-overload]  # checked here
    except TypeError:
        raise UsageError(f"{refusal}, got {type(value).__name__}") from None
    return iterator
