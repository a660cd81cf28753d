"""Building a Dispatcher's plugin manager: built-ins, entry points, plugins given in code."""

from __future__ import annotations

import importlib
import inspect
import os
import threading
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from dispatchkit import hookspecs
from dispatchkit._checks import iterate
from dispatchkit._models import PluginInfo
from dispatchkit._version import __version__
from dispatchkit.builtin import DEFAULT_PLUGINS, PLUGINS_WHEN_SET
from dispatchkit.exceptions import PluginLoadError, UsageError

ENTRY_POINT_GROUP = "dispatchkit"
AUTOLOAD_ENV = "DISPATCHKIT_DISABLE_PLUGIN_AUTOLOAD"

_discovered: tuple[EntryPoint, ...] | None = None
_loaded: dict[str, object] = {}
_lock = threading.Lock()


def discover() -> tuple[EntryPoint, ...]:
    """The entry points of group ``dispatchkit``, looked up once per process."""
    global _discovered
    with _lock:
        if _discovered is None:
            _discovered = tuple(sorted(entry_points(group=ENTRY_POINT_GROUP), key=_ep_key))
        return _discovered


def forget_discovery() -> None:
    """Drop the cached entry points and loaded plugins (for tests that install some)."""
    global _discovered
    with _lock:
        _discovered = None
        _loaded.clear()


def _ep_key(ep: EntryPoint) -> tuple[str, str]:
    return (ep.name, ep.value)


def _load(ep: EntryPoint) -> object:
    with _lock:
        if ep.name in _loaded:
            return _loaded[ep.name]
    try:
        obj = ep.load()
    except Exception as exc:
        raise PluginLoadError(
            f"plugin {ep.name!r} (entry point {ep.value!r}{_dist_suffix(ep)}) failed to load: "
            f"{type(exc).__name__}: {exc}",
            plugin=ep.name,
        ) from exc
    with _lock:
        return _loaded.setdefault(ep.name, obj)


def _dist_suffix(ep: EntryPoint) -> str:
    dist = ep.dist
    return f" in {dist.name} {dist.version}" if dist is not None else ""


def _instantiate(name: str, obj: object) -> object:
    # A class gives every Dispatcher a fresh instance, so plugin state is never shared by accident.
    if not inspect.isclass(obj):
        return obj
    try:
        return obj()
    except Exception as exc:
        raise PluginLoadError(
            f"plugin {name!r}: {obj.__qualname__}() failed: {type(exc).__name__}: {exc}",
            plugin=name,
        ) from exc


def plugin_name(plugin: object) -> str:
    name = getattr(plugin, "name", None)
    if isinstance(name, str) and name:
        return name
    if inspect.ismodule(plugin):
        return plugin.__name__
    cls = plugin if inspect.isclass(plugin) else type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _names(disable: Iterable[str]) -> set[str]:
    """The plugin names of ``disable``; a :class:`UsageError` unless it is a list of str."""
    names = list(iterate(disable, "'disable' takes a list of plugin names"))
    for name in names:
        if not isinstance(name, str):
            raise UsageError(f"'disable' takes plugin names (str), got {name!r}")
    return set(names)


def build_manager(
    plugins: Iterable[object], disable: Iterable[str], settings: Iterable[str] = ()
) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """Register the built-ins, the entry-point plugins, then ``plugins``; skip ``disable``.

    ``settings`` are the names of the settings given: a built-in of
    ``PLUGINS_WHEN_SET`` is loaded only when one of its settings is among them.

    Raises :class:`PluginLoadError` for a plugin that cannot be loaded or that
    implements a hook that does not exist (a misspelt or unprefixed name).
    """
    if isinstance(disable, str) or isinstance(plugins, (str, bytes)):
        raise UsageError("'plugins' and 'disable' take lists, not a single string")
    blocked = _names(disable)
    plugins = list(iterate(plugins, "'plugins' takes a list"))
    # A plugin given in code replaces a built-in or entry-point plugin of the same name.
    given: dict[str, object] = {}
    for plugin in plugins:
        name = plugin_name(plugin)
        if name in given:
            raise PluginLoadError(f"two plugins are named {name!r}", plugin=name)
        given[name] = plugin
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []

    def register(name: str, plugin: object, **meta: Any) -> None:
        if name in blocked:
            return
        try:
            pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginLoadError(
                f"plugin {name!r} cannot be registered: {exc}", plugin=name
            ) from exc
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        infos.append(PluginInfo(name=name, hooks=hooks, plugin=plugin, **meta))

    given_settings = set(settings)
    wanted = [
        name for name, names in PLUGINS_WHEN_SET.items() if given_settings.intersection(names)
    ]
    for module_name in (*DEFAULT_PLUGINS, *wanted):
        if module_name in given:
            continue
        module = importlib.import_module(f"dispatchkit.builtin.{module_name}")
        register(
            module_name,
            module.Plugin(),
            builtin=True,
            distribution="dispatchkit",
            version=__version__,
        )
    if not os.environ.get(AUTOLOAD_ENV):
        for ep in discover():
            if ep.name in blocked or ep.name in given:
                continue  # a disabled or replaced plugin is not even imported
            dist = ep.dist
            register(
                ep.name,
                _instantiate(ep.name, _load(ep)),
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
            )
    for name, plugin in given.items():
        register(name, _instantiate(name, plugin))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        raise PluginLoadError(
            f"plugin {name!r} implements an unknown hook (hooks are named dispatchkit_*): {exc}",
            plugin=name,
        ) from exc
    return pm, infos
