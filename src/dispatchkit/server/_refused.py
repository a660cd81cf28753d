"""The one error of the server side: a request TaskApp will not run."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

__all__ = ["Refused"]


class Refused(Exception):
    """The request may not run: answer ``status`` with a failure envelope carrying ``reason``.

    Raised for every refusal, by TaskApp (bad arguments, unknown task, a body
    too large), its signature check (bad or replayed signature) and its gateway
    (a full store, an unknown id); ``headers`` go with the answer
    (``Retry-After``, ``Allow``).
    """

    def __init__(
        self, status: HTTPStatus, reason: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)
