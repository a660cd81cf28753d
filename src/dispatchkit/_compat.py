"""The Celery-compatible API: ``URL(...).get_async(...)`` and ``HttpDispatchTask.delay(...)``.

Both run on a Dispatcher: the one given, or a default one created lazily per
process (a forked child gets its own) and closed at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlsplit, urlunsplit

from dispatchkit._dispatcher import TASK_NAME, Dispatcher
from dispatchkit._models import Result
from dispatchkit.exceptions import UsageError

_default: Dispatcher | None = None
_default_pid = 0
_default_lock = threading.Lock()


def default_dispatcher() -> Dispatcher:
    """The process's default Dispatcher, created on first use with default settings."""
    global _default, _default_pid
    with _default_lock:
        if _default is None or _default_pid != os.getpid():
            # After a fork the parent's pools and threads are not ours: start afresh.
            _default, _default_pid = Dispatcher(), os.getpid()
        return _default


@atexit.register
def _close_default() -> None:
    global _default
    with _default_lock:
        dispatcher, _default = _default, None
    if dispatcher is not None and _default_pid == os.getpid():
        dispatcher.close()


class URL:
    """A task's URL whose query can be edited, with Celery 1.0's call methods.

    ``query`` is a dict of the URL's query arguments (a repeated key holds a
    list); edit it and ``str(url)`` re-encodes it. Keyword arguments of a call
    are merged into the query as the protocol says: a keyword of the same name wins.
    """

    def __init__(self, url: str, dispatcher: Dispatcher | None = None) -> None:
        if not isinstance(url, str):
            raise UsageError(f"URL needs a str, got {type(url).__name__}")
        parts = urlsplit(url)
        self._parts = parts
        self.dispatcher = dispatcher
        self.query: dict[str, str | list[str]] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in self.query:
                previous = self.query[key]
                self.query[key] = (
                    [*previous, value] if isinstance(previous, list) else [previous, value]
                )
            else:
                self.query[key] = value

    def __str__(self) -> str:
        pairs = [
            (key, item)
            for key, value in self.query.items()
            for item in (value if isinstance(value, list) else [value])
        ]
        query = "&".join(f"{quote_plus(k)}={quote_plus(str(v))}" for k, v in pairs)
        p = self._parts
        return urlunsplit((p.scheme, p.netloc, p.path, query, p.fragment))

    def __repr__(self) -> str:
        from dispatchkit._redact import mask_url

        return f"URL({mask_url(str(self))!r})"

    def _dispatcher(self) -> Dispatcher:
        return self.dispatcher or default_dispatcher()

    def get_async(self, **kwargs: Any) -> Result:
        """Start a GET call; return its result handle."""
        return self._dispatcher().submit(str(self), "GET", **kwargs)

    def post_async(self, **kwargs: Any) -> Result:
        """Start a form-encoded POST call; return its result handle."""
        return self._dispatcher().submit(str(self), "POST", **kwargs)

    def get(self, **kwargs: Any) -> Any:
        """Make a GET call and return the retval."""
        return self._dispatcher().call(str(self), "GET", **kwargs)

    def post(self, **kwargs: Any) -> Any:
        """Make a form-encoded POST call and return the retval."""
        return self._dispatcher().call(str(self), "POST", **kwargs)


class HttpDispatchTask:
    """Celery 1.0's task, kept as a name: ``HttpDispatchTask.delay(url=..., method=..., **kw)``.

    Not for subclassing: behaviour is changed by plugins (see docs/plugins.md).
    """

    name = TASK_NAME

    def __init__(self) -> None:
        raise TypeError("HttpDispatchTask is used through its class methods, not instantiated")

    @classmethod
    def delay(cls, url: str, method: str = "GET", **kwargs: Any) -> Result:
        """Start the call; the task's arguments are the other keywords."""
        return default_dispatcher().submit(url, method, **kwargs)

    @classmethod
    def apply_async(
        cls,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        dispatcher: Dispatcher | None = None,
        **options: Any,
    ) -> Result:
        """Celery's signature: ``kwargs`` holds ``url``, ``method`` and the task's arguments.

        ``options`` are those of :meth:`Dispatcher.apply_async` (``timeout``,
        ``headers``, ``json``, and plugin ``options={"signing_key": ...}``).
        """
        if args:
            raise UsageError("HttpDispatchTask takes keyword arguments only (url, method, ...)")
        arguments = dict(kwargs or {})
        try:
            url = arguments.pop("url")
        except KeyError:
            raise UsageError("HttpDispatchTask.apply_async needs kwargs['url']") from None
        method = arguments.pop("method", "GET")
        d = dispatcher or default_dispatcher()
        return d.apply_async(url, method, arguments, task_id=task_id, **options)
