"""Reading a response: the codec for its content type, its envelope, the error it means."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dispatchkit._models import STATUS_FAILURE, STATUS_SUCCESS, Codec, Request, Response
from dispatchkit._redact import excerpt
from dispatchkit.exceptions import (
    DispatchError,
    HTTPStatusError,
    InvalidResponseError,
    RemoteExecuteError,
    UnknownStatusError,
)

#: Content types are chosen by servers; past this many, codecs are resolved without caching.
CODEC_CACHE_MAX = 64


class ResponseReader:
    """Turns responses into retvals or errors (docs/protocol.md), with codecs resolved once each.

    ``resolve(media_type)`` asks the plugins for a codec (the
    ``dispatchkit_codec`` hook); its answer, ``None`` included, is cached per
    Content-Type header as sent, so a call parses no header.
    """

    def __init__(self, resolve: Callable[[str], Codec | None], follow_redirects: int) -> None:
        self._resolve = resolve
        self._codecs: dict[str, Codec | None] = {}
        self._follow = follow_redirects

    def retval(self, request: Request, response: Response) -> Any:
        """The retval of a 2xx answer, or the error its envelope means."""
        envelope = self.codec(request, response).decode(response)
        if envelope.status == STATUS_SUCCESS:
            return envelope.retval
        if envelope.status == STATUS_FAILURE:
            raise RemoteExecuteError(envelope.reason or "", status=response.status, request=request)
        raise UnknownStatusError(
            f"unknown envelope status {envelope.status!r}", body=response.body, request=request
        )

    def status_error(self, request: Request, response: Response) -> DispatchError:
        """A non-2xx answer: the task's failure when it sent an envelope, else the status."""
        try:
            envelope = self.codec(request, response).decode(response)
        except DispatchError:
            envelope = None
        if envelope is not None and envelope.status == STATUS_FAILURE:
            return RemoteExecuteError(
                envelope.reason or "",
                status=response.status,
                headers=response.headers,
                request=request,
            )
        status = response.status
        message = f"HTTP {status}"
        if 300 <= status < 400:
            location = response.header("location")
            target = f"to {location!r}" if location else "without a Location"
            why = f"after {self._follow} followed" if self._follow else "redirects are not followed"
            message += f" redirect {target} ({why})"
        elif response.body:
            message += f": {excerpt(response.body)}"
        return HTTPStatusError(
            message, status=status, headers=response.headers, body=response.body, request=request
        )

    def codec(self, request: Request, response: Response) -> Codec:
        content_type = response.header("content-type") or ""
        try:
            codec = self._codecs[content_type]
        except KeyError:
            codec = self._resolve(response.media_type)
            if len(self._codecs) < CODEC_CACHE_MAX:
                self._codecs[content_type] = codec
        if codec is None:
            raise InvalidResponseError(
                f"no codec for content type {response.media_type!r}: {excerpt(response.body)}",
                body=response.body,
                status=response.status,
                request=request,
            )
        return codec
