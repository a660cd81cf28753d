"""What travels between the caller and the workers: the task, its message, its states.

A message of task ``dispatchkit.http_dispatch`` has one positional argument,
the call as plain JSON (``Call.to_dict()``), and three keyword arguments:
``attempt`` (from 1), ``schedule`` (``RetrySchedule.to_dict()``, or ``None``
when the durable schedule is off) and ``token``, unique to the message (a
copy the broker hands back after a crash keeps it). Its Celery task id is the
dispatchkit task id, sent as ``Idempotency-Key`` on every attempt.

A message of task ``dispatchkit.http_dispatch_batch`` carries the first
attempt of several calls (``Dispatcher.submit_many``): its positional argument
is the list of the calls (each ``Call.to_dict()``, with its own task id), its
keyword arguments those of a single call's message, shared by the chunk. Its
Celery task id is its own: the calls' results are stored under theirs. Every
later attempt of a call is a single message.
"""

from __future__ import annotations

import uuid
from typing import Any

import celery

from dispatchkit import mask_url

TASK_NAME = "dispatchkit.http_dispatch"
BATCH_TASK_NAME = "dispatchkit.http_dispatch_batch"


#: The options of every ``dispatchkit.http_dispatch`` message: its worker stores the call's
#: result itself (with its attempt records and its end in the ledger, in one round trip),
#: so Celery does not store it again. A handle from ``send_task`` with these options would
#: not wait for the result: take ``app.AsyncResult(task_id)`` instead.
SEND_OPTIONS: dict[str, Any] = {"ignore_result": True}


def message_kwargs(attempt: int, schedule: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments of a new message of attempt ``attempt``."""
    return {"attempt": attempt, "schedule": schedule, "token": uuid.uuid4().hex}


def send_call(
    app: celery.Celery,
    call: dict[str, Any],
    attempt: int,
    schedule: dict[str, Any] | None,
    *,
    task_id: str,
    queue: str | None,
) -> None:
    """Send attempt ``attempt`` of ``call`` as a message of its own, under ``task_id``."""
    app.send_task(
        TASK_NAME,
        args=[call],
        kwargs=message_kwargs(attempt, schedule),
        task_id=task_id,
        queue=queue,
        argsrepr=f"({_shown(call)},)",
        kwargsrepr=f"{{'attempt': {attempt}}}",
        **SEND_OPTIONS,
    )


def send_chunk(
    app: celery.Celery,
    calls: list[dict[str, Any]],
    schedule: dict[str, Any] | None,
    *,
    queue: str | None,
) -> None:
    """Send the first attempt of ``calls`` as one message (its task id is its own)."""
    app.send_task(
        BATCH_TASK_NAME,
        args=[calls],
        kwargs=message_kwargs(1, schedule),
        queue=queue,
        argsrepr=f"([{len(calls)} calls, the first {_shown(calls[0]) if calls else None}],)",
        kwargsrepr="{'attempt': 1}",
        **SEND_OPTIONS,
    )


def _shown(call: dict[str, Any]) -> str:
    """The call as a message's ``argsrepr`` shows it (events, Flower, ``celery inspect``):
    its method and masked URL, never its arguments or headers.

    Celery's own ``argsrepr`` would be the ``saferepr`` of the whole call, secrets in its
    headers included, and cost more CPU time than the rest of sending the message.
    """
    url = call.get("url")
    return f"'{call.get('method', 'GET')} {mask_url(url) if isinstance(url, str) else '?'}'"


class CarriedError(Exception):
    """A dispatchkit error on its way from a worker, as JSON in ``args[0]``.

    Celery's JSON serializer keeps only an exception's type name and args; the
    caller's result handle turns this back into the original error, with its
    type, reason and context (see ``dispatchkit.exceptions.error_from_dict``).
    """


class Waiting(Exception):
    """The meta of Celery state ``RETRY``: attempt ``args[1]`` is due at ``args[0]``.

    An exception because Celery reads the meta of ``RETRY`` as one; it is never
    raised. ``args[0]`` is in unix seconds.
    """

    def __init__(self, due: float, attempt: int) -> None:
        super().__init__(due, attempt)

    @property
    def due(self) -> float:
        return float(self.args[0])

    @property
    def attempt(self) -> int:
        return int(self.args[1])
