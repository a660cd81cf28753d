"""Turning received arguments into the Python values a task's annotations ask for.

Arguments arrive in two shapes: from a query string or a form body every key
holds a :class:`FormValues` (all the strings given for it, in order); from a
JSON body a key holds the decoded JSON value. A :data:`Converter` is built once
per parameter, when the task is registered, and accepts both shapes.
"""

from __future__ import annotations

import inspect
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ArgumentError", "Converter", "FormValues", "TaskSpec"]

Converter = Callable[[object], object]
"""Turns one received value into the parameter's value, or raises :class:`ArgumentError`."""

_NONE_TYPE = type(None)
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class FormValues(list[str]):
    """Every string a query string or form body gave for one key, in order."""


class ArgumentError(ValueError):
    """A received value does not fit the parameter; the message says why."""


def _show(value: object, limit: int = 60) -> str:
    try:
        text = repr(value)
    except RecursionError:  # a JSON body nested a thousand deep
        text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _single(value: object) -> object:
    """The one value of a scalar parameter: form keys may repeat, scalars may not."""
    if isinstance(value, FormValues):
        if len(value) != 1:
            raise ArgumentError(f"expected one value, got {len(value)}")
        return value[0]
    return value


def _to_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ArgumentError(f"invalid str {_show(value)}")


def _to_int(value: object) -> int:
    # bool is an int subclass, but true is not a number a caller meant to send
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ArgumentError(f"invalid int {_show(value)}")


def _to_float(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ArgumentError(f"invalid float {_show(value)}")


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ArgumentError(f"invalid bool {_show(value)}")


def _as_received(value: object) -> object:
    # one form value is a str, a repeated key a list of str; JSON stays as decoded
    if isinstance(value, FormValues):
        return value[0] if len(value) == 1 else list(value)
    return value


_SCALARS: dict[object, Callable[[object], object]] = {
    str: _to_str,
    int: _to_int,
    float: _to_float,
    bool: _to_bool,
}


def _scalar(convert: Callable[[object], object]) -> Converter:
    return lambda value: convert(_single(value))


def _listing(convert: Callable[[object], object]) -> Converter:
    def to_list(value: object) -> list[object]:
        items = value if isinstance(value, list) else [value]
        return [convert(item) for item in items]

    return to_list


def _optional(inner: Converter, keep_empty: bool) -> Converter:
    def to_optional(value: object) -> object:
        if value is None:
            return None
        # a form cannot send null; an empty value stands for None (but "" is a str)
        if not keep_empty and isinstance(value, FormValues) and value == [""]:
            return None
        return inner(value)

    return to_optional


def converter_for(annotation: object) -> Converter:
    """Build the converter for a resolved annotation.

    Supported: ``str``, ``int``, ``float``, ``bool``, ``list[T]`` (and bare
    ``list``) of those, ``Optional[T]`` / ``T | None`` of any of these, and
    ``Any`` or no annotation (the value as received). Anything else raises
    :class:`TypeError`, so an unsupported task fails at registration.
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        return _as_received
    if annotation in _SCALARS:
        return _scalar(_SCALARS[annotation])
    origin = typing.get_origin(annotation)
    if annotation is list or origin is list:
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        if item is Any:
            return _listing(lambda value: value)
        if item not in _SCALARS:
            raise TypeError(f"unsupported list item type {item!r}")
        return _listing(_SCALARS[item])
    if origin is typing.Union or origin is types.UnionType:
        members = [arg for arg in typing.get_args(annotation) if arg is not _NONE_TYPE]
        if len(members) == 1 and len(typing.get_args(annotation)) == 2:
            (inner,) = members
            return _optional(converter_for(inner), keep_empty=inner is str)
    raise TypeError(f"unsupported annotation {annotation!r}")


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    convert: Converter
    required: bool


class TaskSpec:
    """A registered task: the function, whether it is async, and how to build its
    keyword arguments."""

    __slots__ = ("extra", "func", "is_async", "name", "params")

    def __init__(self, name: str, func: Callable[..., Any]) -> None:
        """Inspect ``func``; raise :class:`TypeError` if it cannot be served."""
        #: an ``async def`` function (or an object whose ``__call__`` is one): awaited
        self.is_async = inspect.iscoroutinefunction(func) or (
            callable(func)
            and not inspect.isroutine(func)
            and inspect.iscoroutinefunction(type(func).__call__)
        )
        signature = inspect.signature(func)
        annotated = func if inspect.isroutine(func) else type(func).__call__
        try:
            hints = typing.get_type_hints(annotated)
        except Exception as exc:
            raise TypeError(f"task {name!r}: cannot resolve annotations: {exc}") from exc
        self.name = name
        self.func = func
        self.params: list[_Param] = []
        self.extra: Converter | None = None
        for param in signature.parameters.values():
            if param.kind is param.VAR_POSITIONAL:
                continue  # a caller can only send keywords, so *args stays empty
            if param.kind is param.POSITIONAL_ONLY:
                raise TypeError(f"task {name!r}: positional-only parameter {param.name!r}")
            annotation = hints.get(param.name, inspect.Parameter.empty)
            try:
                convert = converter_for(annotation)
            except TypeError as exc:
                raise TypeError(f"task {name!r}, parameter {param.name!r}: {exc}") from None
            if param.kind is param.VAR_KEYWORD:
                self.extra = convert
            else:
                self.params.append(_Param(param.name, convert, param.default is param.empty))

    def bind(self, received: dict[str, object]) -> dict[str, object]:
        """Convert ``received`` into keyword arguments for :attr:`func`.

        Parameters missing from ``received`` take their defaults. Raises
        :class:`ArgumentError` naming the first argument that is missing,
        invalid, or unexpected (there is no ``**kwargs`` to take it).
        """
        kwargs: dict[str, object] = {}
        for param in self.params:
            if param.name not in received:
                if param.required:
                    raise ArgumentError(f"missing argument {param.name!r}")
                continue
            kwargs[param.name] = _convert_one(param.name, param.convert, received[param.name])
        for key, value in received.items():
            if key in kwargs:
                continue
            if self.extra is None:
                raise ArgumentError(f"unexpected argument {key!r}")
            kwargs[key] = _convert_one(key, self.extra, value)
        return kwargs


def _convert_one(name: str, convert: Converter, value: object) -> object:
    try:
        return convert(value)
    except ArgumentError as exc:
        raise ArgumentError(f"argument {name!r}: {exc}") from None
