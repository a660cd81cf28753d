"""Built-in codec: the JSON envelope, with orjson.

Lenient on the content type (``application/json``, ``*+json``, a missing
type and any ``text/*``, because old servers send JSON as ``text/html``),
strict on the JSON itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from dispatchkit._models import Envelope, Response
from dispatchkit._redact import excerpt
from dispatchkit.exceptions import InvalidResponseError
from dispatchkit.hookspecs import hookimpl

if TYPE_CHECKING:
    from dispatchkit._dispatcher import Dispatcher

JSON = "application/json"


class JSONCodec:
    """Decodes and encodes the JSON envelope."""

    media_type = JSON

    def decode(self, response: Response) -> Envelope:
        body = response.body
        if not body:
            raise InvalidResponseError("empty response body", body=body, status=response.status)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidResponseError(
                f"response is not valid JSON ({exc.msg}): {excerpt(body)}",
                body=body,
                status=response.status,
            ) from exc
        return Envelope.from_object(obj, body)

    def encode(self, envelope: Envelope) -> bytes:
        return orjson.dumps(envelope.to_object(), option=orjson.OPT_NON_STR_KEYS)


def handles(media_type: str) -> bool:
    """True for the content types this codec takes."""
    return (
        media_type in ("", JSON) or media_type.startswith("text/") or media_type.endswith("+json")
    )


class Plugin:
    name = "codec"

    def __init__(self) -> None:
        self._codec = JSONCodec()

    @hookimpl(trylast=True)
    def dispatchkit_codec(self, media_type: str, dispatcher: Dispatcher) -> JSONCodec | None:
        return self._codec if handles(media_type) else None
