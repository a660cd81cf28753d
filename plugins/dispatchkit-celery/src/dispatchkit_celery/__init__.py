"""dispatchkit-celery: an executor plugin that runs calls on Celery workers.

Chosen with ``Dispatcher(executor="celery")`` or ``DISPATCHKIT_EXECUTOR=celery``;
registered through the entry point ``celery`` in the group ``dispatchkit``.
Importing this package imports no Celery: that happens at the first ``submit()``.

Settings (``Dispatcher(celery_broker=..., ...)``, else environment variables):

======================  =============================  ==============================
setting                 environment                    default
======================  =============================  ==============================
``celery_app``          --                             an app made from the two below
``celery_broker``       ``DISPATCHKIT_CELERY_BROKER``  ``redis://127.0.0.1:6379/0``
``celery_backend``      ``DISPATCHKIT_CELERY_BACKEND`` the broker URL
``celery_queue``        ``DISPATCHKIT_CELERY_QUEUE``   ``dispatchkit``
``celery_get_timeout``  --                             300 seconds
======================  =============================  ==============================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dispatchkit import Dispatcher, Settings, hookimpl

if TYPE_CHECKING:
    from dispatchkit_celery._executor import CeleryExecutor

__all__ = ["CeleryPlugin"]

NAME = "celery"


class CeleryPlugin:
    """Provides the ``celery`` executor."""

    name = NAME

    def __init__(self) -> None:
        self._options: dict[str, Any] = {}

    @hookimpl
    def dispatchkit_configure(self, settings: Settings) -> None:
        extra = settings.extra
        self._options = {
            "app": extra("celery_app"),
            "broker": extra("celery_broker"),
            "backend": extra("celery_backend"),
            "queue": extra("celery_queue"),
            "get_timeout": extra("celery_get_timeout", 300.0),
        }

    @hookimpl
    def dispatchkit_executor(self, dispatcher: Dispatcher) -> CeleryExecutor | None:
        if dispatcher.settings.executor != NAME:
            return None
        from dispatchkit_celery._executor import CeleryExecutor

        return CeleryExecutor(**self._options)
