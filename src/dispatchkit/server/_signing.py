"""TaskApp's side of Standard Webhooks: verify each request, refuse replays.

The HMAC scheme itself is :mod:`dispatchkit.signing`, shared with the sender
(the built-in ``signing`` plugin, which TaskApp's own gateway Dispatcher loads
to sign its calls back to the app).
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus

from dispatchkit._checks import count, seconds
from dispatchkit.server._refused import Refused
from dispatchkit.signing import (
    DEFAULT_TOLERANCE,
    SecretInput,
    SignatureError,
    SigningKeys,
    check,
    signs_body,
)

__all__ = ["REPLAY_MAX", "ReplayCache", "RequestVerifier"]

#: Ids remembered at most. Only requests with a valid signature add one, so only
#: a key holder can fill it: 100,000 is ~330 signed requests a second, sustained
#: over the default 300 s window, for some tens of MB at most.
REPLAY_MAX = 100_000


class ReplayCache:
    """The ``webhook-id`` of every accepted request, until its timestamp is stale anyway.

    An id is kept until ``timestamp + tolerance``: after that the timestamp
    check refuses the message, so the id need not be remembered. At most
    ``max_entries`` ids are kept; when that many are still live, a new id is
    **refused** (503 with ``Retry-After``), never admitted by forgetting an
    older one: evicting would silently reopen the replay window of the evicted
    id, while refusing only delays a sender that is retrying anyway.
    """

    def __init__(self, max_entries: int = REPLAY_MAX) -> None:
        count(max_entries, "signing_replay_max")
        self.max_entries = max_entries
        self._expires: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # (expiry, id), stale pairs included
        self._follow_up: dict[str, str] = {}  # id -> the one path it may still call
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._expires)

    def add(self, msg_id: str, expires: float, path: str, now: float) -> None:
        """Remember ``msg_id`` until ``expires``; raise :class:`Refused` for an id seen before."""
        with self._lock:
            self._purge(now)
            if msg_id in self._expires:
                if self._follow_up.get(msg_id) != path:
                    raise Refused(HTTPStatus.UNAUTHORIZED, "replayed webhook-id: already received")
                del self._follow_up[msg_id]
                expires = max(expires, self._expires[msg_id])
            elif len(self._expires) >= self.max_entries:
                wait = math.ceil(self._heap[0][0] - now) if self._heap else 1
                raise Refused(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "too many signed requests in the replay window; try again later",
                    [("Retry-After", str(max(1, wait)))],
                )
            self._expires[msg_id] = expires
            heapq.heappush(self._heap, (expires, msg_id))

    def allow_follow_up(self, msg_id: str, path: str) -> None:
        """Let one more request with ``msg_id`` reach ``path`` (the gateway's own callback)."""
        with self._lock:
            if msg_id in self._expires:
                self._follow_up[msg_id] = path

    def _purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] < now:
            expires, msg_id = heapq.heappop(heap)
            if self._expires.get(msg_id) == expires:
                del self._expires[msg_id]
                self._follow_up.pop(msg_id, None)


class RequestVerifier:
    """Verifies the Standard Webhooks headers of a TaskApp's requests (WSGI or ASGI)."""

    def __init__(
        self,
        secret: SecretInput,
        tolerance: float = DEFAULT_TOLERANCE,
        replay_max: int = REPLAY_MAX,
    ) -> None:
        self.keys = SigningKeys.parse(secret)
        self.tolerance = seconds(tolerance, "signing_tolerance")
        self.replay = ReplayCache(replay_max)

    def __repr__(self) -> str:
        return f"<RequestVerifier {self.keys!r} tolerance={self.tolerance:g}s>"

    def verify(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: Mapping[str, str],
        body: bytes | None,
    ) -> None:
        """Accept the request or raise :class:`Refused`; an accepted id is remembered.

        ``body`` is the raw body of a POST, PUT or PATCH (the signed payload);
        other methods sign ``query``, the raw query string as sent. ``headers``
        are the request's, looked up without regard to case. A signed POST may
        not carry a query string as well, since nothing would authenticate its
        arguments. ``path`` is where the request goes (an id may reach the
        gateway's follow-up path once more).
        """
        with_body = signs_body(method)
        payload = (body or b"") if with_body else query
        now = time.time()
        try:
            msg_id, timestamp = check(headers, payload, self.keys, self.tolerance, now)
        except SignatureError as exc:
            raise Refused(HTTPStatus.UNAUTHORIZED, exc.message) from None
        if with_body and query:
            raise Refused(
                HTTPStatus.BAD_REQUEST,
                f"a signed {method} carries its arguments in the body: "
                "its query string would not be covered by the signature",
            )
        self.replay.add(msg_id, timestamp + self.tolerance, path, now)
