"""The built-in JSON codec and the Envelope value, without a server."""

from __future__ import annotations

import pytest

from dispatchkit import Envelope, InvalidResponseError, Response, UnknownStatusError
from dispatchkit.builtin.codec import JSONCodec, handles


def decode(body: bytes, content_type: str = "application/json") -> Envelope:
    return JSONCodec().decode(Response(200, {"Content-Type": content_type}, body))


def test_success_with_and_without_retval() -> None:
    assert decode(b'{"status":"success","retval":[1,{"a":null}]}').retval == [1, {"a": None}]
    assert decode(b'{"status":"success"}') == Envelope("success", retval=None)


def test_failure_reason() -> None:
    assert decode(b'{"status":"failure","reason":"boom"}').reason == "boom"
    assert decode(b'{"status":"failure"}').reason == ""
    assert decode(b'{"status":"failure","reason":42}').reason == "42"


@pytest.mark.parametrize(
    "body", [b"", b"nope", b"[]", b"1", b'"s"', b"null", b'{"retval":1}', b"\xff\xfe"]
)
def test_not_an_envelope(body: bytes) -> None:
    with pytest.raises(InvalidResponseError):
        decode(body)


@pytest.mark.parametrize("status", [b'"pending"', b"1", b"null", b'"SUCCESS"'])
def test_unknown_status(status: bytes) -> None:
    with pytest.raises(UnknownStatusError):
        decode(b'{"status":' + status + b"}")


def test_round_trip() -> None:
    codec = JSONCodec()
    for envelope in (Envelope.success({"x": [1, 2]}), Envelope.failure("ValueError: no")):
        assert codec.decode(Response(200, {}, codec.encode(envelope))) == envelope


@pytest.mark.parametrize(
    ("media_type", "taken"),
    [
        ("application/json", True),
        ("", True),
        ("text/html", True),
        ("text/plain", True),
        ("application/vnd.api+json", True),
        ("application/xml", False),
        ("application/octet-stream", False),
    ],
)
def test_media_types(media_type: str, taken: bool) -> None:
    assert handles(media_type) is taken


def test_response_header_lookup_ignores_case() -> None:
    response = Response(200, {"Content-Type": "Text/HTML; charset=utf-8"}, b"")
    assert response.header("content-type") == "Text/HTML; charset=utf-8"
    assert response.media_type == "text/html"
    assert Response(200, {}, b"").media_type == ""
