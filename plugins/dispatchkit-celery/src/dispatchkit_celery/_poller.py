"""The poller: a thread in each worker's main process that sends the calls due in the ledger.

Every ``delivery_poll_interval`` seconds it claims due entries (atomically,
so that among many workers one poller gets each), sends each call's current
attempt as a new message with the same task id, and moves the entry, if it
still carries its claim, to the time of a resend (taking the message removes
it). A poller that dies after claiming leaves its entries to come back after
the claim lease: sent again, a duplicate message at most, which the worker
that receives it drops.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar

from celery import Celery, bootsteps

from dispatchkit_celery._ledger import Ledger
from dispatchkit_celery._schedule import DEFAULT_RESEND_AFTER
from dispatchkit_celery._task import worker_process
from dispatchkit_celery._wire import send_call

log = logging.getLogger("dispatchkit.celery")

#: Most entries claimed at once; a full batch is followed by the next without a pause.
BATCH = 100


class Poller:
    """Sends due calls from ``ledger`` through ``app``, until :meth:`stop`."""

    def __init__(self, app: Celery, ledger: Ledger, interval: float, lease: float) -> None:
        self.app = app
        self.ledger = ledger
        self.interval = interval
        self.lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dispatchkit-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.ledger.close()

    def send_due(self) -> int:
        """Claim the due calls (one batch) and send them; return how many were claimed."""
        claim = self.ledger.claim(self.lease, BATCH)
        for task_id in claim.task_ids:
            pending = self.ledger.pending(task_id)
            if pending is None:  # taken, done or gone meanwhile: nothing to send
                self.ledger.release(task_id, claim, None)
                continue
            send_call(self.app, pending.call, pending.attempt, pending.schedule,
                      task_id=task_id, queue=pending.queue or None)  # fmt: skip
            resend_after = pending.schedule.get("resend_after", DEFAULT_RESEND_AFTER)
            self.ledger.release(task_id, claim, float(resend_after))
            log.info("task %s: attempt %d sent", task_id, pending.attempt)
        return len(claim.task_ids)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self.send_due()
            except Exception:  # Redis or the broker away: the entries wait, try again
                log.exception("dispatchkit poller: cannot send due calls")
                claimed = 0
            if claimed < BATCH:
                self._stop.wait(self.interval)


class PollerStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery ships no type hints
    """Runs a :class:`Poller` in the worker's main process, from start-up to shutdown."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}  # after the pool forked

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.poller: Poller | None = None

    def start(self, worker: Any) -> None:
        config = worker_process(worker.app).config
        assert config.ledger_url is not None  # WorkerConfig refuses a worker without one
        self.poller = Poller(
            worker.app,
            Ledger(config.ledger_url),
            config.delivery_poll_interval,
            config.delivery_claim_lease,
        )
        self.poller.start()

    def stop(self, worker: Any) -> None:
        if self.poller is not None:
            self.poller.stop()
            self.poller = None
