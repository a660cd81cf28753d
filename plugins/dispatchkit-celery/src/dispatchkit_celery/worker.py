"""The worker's app: ``celery -A dispatchkit_celery.worker worker``.

Configured from the environment: ``DISPATCHKIT_CELERY_BROKER``,
``DISPATCHKIT_CELERY_BACKEND``, ``DISPATCHKIT_CELERY_QUEUE``, and the worker's
settings as JSON in ``DISPATCHKIT_CELERY_WORKER_SETTINGS`` (its Dispatcher's
settings and its delivery settings). Bad settings stop the worker here, before
it takes a message: a ``UsageError`` says what to change.
"""

from __future__ import annotations

from dispatchkit_celery._app import make_app
from dispatchkit_celery._config import WorkerConfig

config = WorkerConfig.from_env()
config.check()
app = make_app(config.broker, visibility_timeout=config.visibility_timeout)
