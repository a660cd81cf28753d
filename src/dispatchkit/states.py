"""The states of a submitted call, named as Celery names them."""

from __future__ import annotations

__all__ = ["FAILURE", "PENDING", "READY_STATES", "RETRY", "STARTED", "SUCCESS"]

#: Queued, not started yet (also the state of an id nobody knows, as in Celery).
PENDING = "PENDING"
#: Running.
STARTED = "STARTED"
#: An attempt failed and the next one waits for its time (a durable retry schedule,
#: dispatchkit-celery); no worker holds the call meanwhile. Not ready.
RETRY = "RETRY"
#: Finished; the task's retval is the result.
SUCCESS = "SUCCESS"
#: Finished with an error; the error is the result.
FAILURE = "FAILURE"

READY_STATES = frozenset({SUCCESS, FAILURE})
