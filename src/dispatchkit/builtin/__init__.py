"""Built-in plugins: each module holds a ``Plugin`` class whose hooks are ``trylast``.

An installed plugin therefore overrides a default whatever the registration
order, and ``Dispatcher(disable=["retry"])`` turns a default off by name.
"""

from __future__ import annotations

#: Names of the built-in plugin modules, in registration order.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "transport",
    "async_transport",
    "codec",
    "retry",
    "endpoints",
    "executor",
)
#: Built-in plugins loaded only when one of their settings is given (module name:
#: settings), so that a Dispatcher without them pays for none of their hooks.
PLUGINS_WHEN_SET: dict[str, tuple[str, ...]] = {"signing": ("signing_secret", "signing_keys")}
