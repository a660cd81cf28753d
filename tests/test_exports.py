"""The public surface: a sorted, complete ``__all__`` and the error hierarchy."""

from __future__ import annotations

import builtins
import inspect

import pytest

import dispatchkit
from dispatchkit import exceptions, server


def _defined_under(value: object, package: str) -> bool:
    """Defined in ``package`` itself or in one of its private modules, not imported."""
    home = getattr(value, "__module__", "")
    if package == "dispatchkit":
        return home.startswith("dispatchkit._") or home == "dispatchkit.exceptions"
    return home == package or home.startswith(package + "._")


@pytest.mark.parametrize("module", [dispatchkit, exceptions, server])
def test_all_is_sorted_and_complete(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert names == sorted(names)
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and _defined_under(value, module.__name__)  # type: ignore[attr-defined]
    }
    assert public <= set(names)
    for name in names:
        assert hasattr(module, name), name


def test_root_exports_the_core_names() -> None:
    core = """Dispatcher Request Response Envelope Transport Codec hookimpl DispatchError
        TransportError ConnectError DispatchTimeout HTTPStatusError InvalidResponseError
        UnknownStatusError ResponseTooLargeError RemoteExecuteError PluginLoadError"""
    for name in core.split():
        assert name in dispatchkit.__all__, name


def test_hierarchy() -> None:
    d = dispatchkit
    classes = [getattr(exceptions, n) for n in exceptions.__all__ if n[0].isupper()]
    assert all(issubclass(cls, d.DispatchError) for cls in classes)
    assert {cls.__name__ for cls in classes} <= set(dispatchkit.__all__)
    assert issubclass(d.ConnectError, d.TransportError)
    assert issubclass(d.ConnectError, builtins.ConnectionError)
    assert issubclass(d.DispatchTimeout, d.TransportError)
    assert issubclass(d.DispatchTimeout, builtins.TimeoutError)
    assert not issubclass(d.ConnectError, d.DispatchTimeout)
    assert issubclass(d.UnknownStatusError, d.InvalidResponseError)
    assert issubclass(d.ResponseTooLargeError, d.InvalidResponseError)
    assert issubclass(d.EncodeError, TypeError)
    assert issubclass(d.UsageError, ValueError)
    # No name shadows a builtin.
    assert not set(dispatchkit.__all__) & set(dir(builtins))
