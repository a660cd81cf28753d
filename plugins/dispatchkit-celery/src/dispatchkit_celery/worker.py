"""The worker's app: ``celery -A dispatchkit_celery.worker worker``.

Configured from the environment (``DISPATCHKIT_CELERY_BROKER``,
``DISPATCHKIT_CELERY_BACKEND``, ``DISPATCHKIT_CELERY_QUEUE``; worker
Dispatcher settings as JSON in ``DISPATCHKIT_CELERY_WORKER_SETTINGS``).
"""

from __future__ import annotations

from dispatchkit_celery._app import make_app

app = make_app()
