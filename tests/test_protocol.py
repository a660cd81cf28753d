"""The wire protocol and its errors (docs/protocol.md), against the Node.js peer."""

from __future__ import annotations

import asyncio
import pickle
import re
import tracemalloc
from typing import Any

import pytest

from conftest import peer_stats
from dispatchkit import (
    AsyncDispatcher,
    Call,
    ConnectError,
    Dispatcher,
    DispatchError,
    DispatchTimeout,
    EncodeError,
    HTTPStatusError,
    InvalidResponseError,
    RemoteExecuteError,
    ResponseTooLargeError,
    TransportError,
    UnknownStatusError,
    UsageError,
    __version__,
)
from support.probes import free_port

# -- requests -----------------------------------------------------------------


def test_get_and_post_multiply(dispatcher: Dispatcher, peer: str) -> None:
    assert dispatcher.call(f"{peer}/multiply", "GET", x=10, y=10) == 100
    assert dispatcher.call(f"{peer}/multiply", "POST", x=10, y=10) == 100


def test_get_sends_arguments_in_the_query(dispatcher: Dispatcher, peer: str) -> None:
    echo = dispatcher.call(f"{peer}/echo", "GET", x=10, y="a b")
    assert echo["method"] == "GET"
    assert echo["query"] == [["x", "10"], ["y", "a b"]]
    assert echo["body"] == ""


def test_query_merge_keeps_url_arguments_and_keywords_win(
    dispatcher: Dispatcher, peer: str
) -> None:
    echo = dispatcher.call(f"{peer}/echo?a=1&x=2&b=", "GET", x=10)
    assert echo["query"] == [["a", "1"], ["b", ""], ["x", "10"]]


@pytest.mark.parametrize("method", ["HEAD", "DELETE", "OPTIONS"])
def test_other_query_methods(dispatcher: Dispatcher, peer: str, method: str) -> None:
    if method == "HEAD":
        # A HEAD answer has no body, so it can never carry an envelope.
        with pytest.raises(InvalidResponseError, match="empty"):
            dispatcher.call(f"{peer}/echo", method, x=1)
        return
    echo = dispatcher.call(f"{peer}/echo", method, x=1)
    assert echo["method"] == method
    assert echo["query"] == [["x", "1"]]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_body_methods_send_a_form(dispatcher: Dispatcher, peer: str, method: str) -> None:
    echo = dispatcher.call(f"{peer}/echo", method, x=10, y="a&b=c")
    assert echo["method"] == method
    assert echo["content_type"] == "application/x-www-form-urlencoded"
    assert echo["body"] == "x=10&y=a%26b%3Dc"
    assert echo["args"] == {"x": "10", "y": "a&b=c"}
    assert echo["query"] == []


def test_value_encoding(dispatcher: Dispatcher, peer: str) -> None:
    echo = dispatcher.call(
        f"{peer}/echo",
        "POST",
        text="grüße ☃ 日本",
        n=-3,
        f=0.25,
        yes=True,
        no=False,
        items=[1, "two", 3.5],
        pair=("a", "b"),
        skipped=None,
    )
    assert echo["args"] == {
        "text": "grüße ☃ 日本",
        "n": "-3",
        "f": "0.25",
        "yes": "true",
        "no": "false",
        "items": ["1", "two", "3.5"],
        "pair": ["a", "b"],
    }


def test_unicode_in_the_query(dispatcher: Dispatcher, peer: str) -> None:
    echo = dispatcher.call(f"{peer}/echo", "GET", q="ünï cödé ✓", tags=["日本", "ß"])
    assert echo["args"] == {"q": "ünï cödé ✓", "tags": ["日本", "ß"]}


def test_headers_sent(dispatcher: Dispatcher, peer: str) -> None:
    headers = dispatcher.call(f"{peer}/echo")["headers"]
    assert headers["user-agent"] == f"dispatchkit/{__version__}"
    assert len(headers["idempotency-key"]) == 32
    int(headers["idempotency-key"], 16)


def test_apply_options_never_collide_with_arguments(dispatcher: Dispatcher, peer: str) -> None:
    echo = dispatcher.apply(
        f"{peer}/echo",
        "GET",
        {"timeout": "t", "headers": "h", "task_id": "i", "json": "j", "method": "m", "url": "u"},
        task_id="my-task-1",
        headers={"X-Trace": "abc"},
        timeout=3,
    )
    assert echo["args"] == {
        "timeout": "t",
        "headers": "h",
        "task_id": "i",
        "json": "j",
        "method": "m",
        "url": "u",
    }
    assert echo["headers"]["idempotency-key"] == "my-task-1"
    assert echo["headers"]["x-trace"] == "abc"


def test_call_passes_url_and_method_named_arguments_through(
    dispatcher: Dispatcher, peer: str
) -> None:
    echo = dispatcher.call(f"{peer}/echo", "POST", url="u", timeout="t")
    assert echo["args"] == {"url": "u", "timeout": "t"}


def test_json_body_is_opt_in(dispatcher: Dispatcher, peer: str) -> None:
    args = {"x": 10, "nested": {"a": [1, None, True]}, "s": "é"}
    echo = dispatcher.apply(f"{peer}/echo", "POST", args, json=True)
    assert echo["content_type"] == "application/json"
    assert echo["args"] == args


@pytest.mark.parametrize(
    ("value", "kind"),
    [({"a": 1}, "dict"), (object(), "object"), ([[1, 2]], "list"), (b"raw", "bytes")],
)
def test_unencodable_value_is_rejected_before_sending(
    dispatcher: Dispatcher, peer: str, value: object, kind: str
) -> None:
    dispatcher.call(f"{peer}/stats/reset")
    with pytest.raises(EncodeError, match="argument 'bad'") as info:
        dispatcher.call(f"{peer}/echo", "POST", ok=1, bad=value)
    assert isinstance(info.value, TypeError)
    assert info.value.argument == "bad"
    assert kind in str(info.value)
    assert peer_stats(dispatcher, peer)["requests"] == 1  # only the /stats call itself


def test_unencodable_json_value(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(EncodeError, match="argument 'when'"):
        dispatcher.apply(f"{peer}/echo", "POST", {"ok": 1, "when": object()}, json=True)


def test_bad_calls_are_usage_errors(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(UsageError, match="unsupported HTTP method 'FETCH'"):
        dispatcher.call(f"{peer}/echo", "FETCH")
    with pytest.raises(UsageError, match="json=True"):
        dispatcher.apply(f"{peer}/echo", "GET", {"x": 1}, json=True)
    with pytest.raises(UsageError, match="no scheme"):
        dispatcher.call("127.0.0.1/echo")
    with pytest.raises(UsageError, match="no transport for scheme 'ftp'"):
        dispatcher.call("ftp://127.0.0.1/echo")
    with pytest.raises(UsageError, match="url must be a str"):
        dispatcher.call(b"http://127.0.0.1/")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="timeout must be positive"):
        dispatcher.apply(f"{peer}/echo", timeout=0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (10**400, "must be positive and finite, got an int of 1329 bits"),
        (1e10, "must be at most 1e+09 seconds, got 10000000000.0"),
    ],
)
def test_a_duration_past_the_clock_is_a_usage_error(
    dispatcher: Dispatcher, peer: str, value: object, message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        Dispatcher(timeout=value)
    with pytest.raises(UsageError, match=re.escape(message)):
        dispatcher.apply(f"{peer}/echo", timeout=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_form_argument_name_that_is_not_a_str_is_an_encode_error(
    dispatcher: Dispatcher, peer: str, method: str
) -> None:
    with pytest.raises(EncodeError, match="argument name 1 is a int"):
        dispatcher.apply(f"{peer}/echo", method, {1: 2})  # type: ignore[dict-item]
    assert dispatcher.apply(f"{peer}/echo", "POST", {"s": "x", 1: 2}, json=True) is not None  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"egress_allow": 5},
            "setting 'egress_allow' takes a list of CIDRs and host names, got int",
        ),
        ({"egress_allow": [None]}, "takes a list of CIDRs and host names, got None"),
        ({"egress_allow": ["10.0.0.0/99"]}, "'10.0.0.0/99' is not a CIDR"),
        ({"rate_limits": {"http://[::1": "5/s"}}, "takes origins ('https://api.example.com')"),
    ],
)
def test_bad_settings_of_the_wrong_shape_are_usage_errors(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        Dispatcher(**settings)


ARGUMENTS = "a call's arguments must be a mapping of names to values"


@pytest.mark.parametrize(
    ("use", "message"),
    [
        (lambda d, url: d.apply(url, "GET", [("x", 1)]), f"{ARGUMENTS}, got list"),
        (lambda d, url: d.apply_async(url, "POST", "x=1"), f"{ARGUMENTS}, got str"),
        (lambda d, url: d.submit_many(url, [{"x": 1}, 2]), f"{ARGUMENTS}, got int"),
        (lambda d, url: d.map(url, [1.5]), f"{ARGUMENTS}, got float"),
        (lambda d, url: d.submit_many(url, None), "submit_many takes an iterable of calls"),
        (lambda d, url: d.submit_many(url, {"x": 1}), "takes an iterable of calls, got one dict"),
        (lambda d, url: d.map(url, "x=1"), "map takes an iterable of calls, got one str"),
        (lambda d, url: d.map(url, 5), "map takes an iterable of calls, got int"),
        (lambda d, url: d.submit_calls(None), "submit_calls takes an iterable of calls"),
        (lambda d, url: d.apply(url, headers=[("a", "b")]), "headers must be a mapping"),
        (lambda d, url: d.map(url, [{}], concurrency="a"), "concurrency must be a positive int"),
        (lambda d, url: d.execute({"url": url}), "execute takes a dispatchkit.Call, got dict"),
    ],
)
def test_calls_and_arguments_of_the_wrong_type_are_usage_errors(
    dispatcher: Dispatcher, peer: str, use: Any, message: str
) -> None:
    dispatcher.call(f"{peer}/stats/reset")
    with pytest.raises(UsageError, match=re.escape(message)):
        use(dispatcher, f"{peer}/echo")
    assert peer_stats(dispatcher, peer)["requests"] == 1  # only the /stats call itself


@pytest.mark.parametrize(
    ("use", "message"),
    [
        (lambda d, url: d.apply(url, "GET", [("x", 1)]), f"{ARGUMENTS}, got list"),
        (lambda d, url: d.map(url, [{"x": 1}, 2]), f"{ARGUMENTS}, got int"),
        (lambda d, url: d.map(url, None), "map takes an iterable of calls, got NoneType"),
        (lambda d, url: d.map(url, "x=1"), "map takes an iterable of calls, got one str"),
    ],
)
def test_async_calls_that_are_not_mappings_are_usage_errors(
    peer: str, use: Any, message: str
) -> None:
    async def main() -> None:
        async with AsyncDispatcher() as d:
            with pytest.raises(UsageError, match=re.escape(message)):
                await use(d, f"{peer}/echo")

    asyncio.run(main())


# -- responses --------------------------------------------------------------------


def test_failure_envelope_on_200(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(RemoteExecuteError) as info:
        dispatcher.call(f"{peer}/fail", reason="disk full")
    assert info.value.reason == "disk full"
    assert info.value.status == 200


def test_failure_envelope_on_500(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(RemoteExecuteError) as info:
        dispatcher.call(f"{peer}/fail500", "POST", reason="ValueError: bad x")
    assert info.value.reason == "ValueError: bad x"
    assert info.value.status == 500


def test_http_error_without_envelope(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(HTTPStatusError) as info:
        dispatcher.call(f"{peer}/status/404")
    error = info.value
    assert error.status == 404
    assert error.body_excerpt == b"nope 404"
    assert error.headers["content-type"].startswith("text/plain")
    assert "HTTP 404" in str(error)


def test_redirect_is_not_followed(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(HTTPStatusError) as info:
        dispatcher.call(f"{peer}/redirect", to="/multiply?x=1&y=2")
    assert info.value.status == 302
    assert "/multiply?x=1&y=2" in str(info.value)
    assert "not followed" in str(info.value)


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        ("empty", InvalidResponseError, "empty response body"),
        ("json", InvalidResponseError, "not valid JSON.*'{not json'"),
        ("array", InvalidResponseError, "must be a JSON object, got list"),
        ("nostatus", InvalidResponseError, 'no "status"'),
        ("unknown", UnknownStatusError, "unknown envelope status 'pending'"),
    ],
)
def test_invalid_responses(
    dispatcher: Dispatcher, peer: str, path: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        dispatcher.call(f"{peer}/invalid/{path}")
    assert isinstance(info.value, InvalidResponseError)


def test_invalid_response_quotes_at_most_200_bytes(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(InvalidResponseError) as info:
        dispatcher.call(f"{peer}/invalid/long")
    message = str(info.value)
    assert "x" * 200 in message
    assert "x" * 201 not in message
    assert info.value.body_excerpt == b"x" * 200


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/html",
        "text/plain",
        "",
        "application/problem+json",
    ],
)
def test_lenient_content_types(dispatcher: Dispatcher, peer: str, content_type: str) -> None:
    assert dispatcher.call(f"{peer}/content-type", type=content_type) == "typed"


def test_unknown_content_type_has_no_codec(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(InvalidResponseError, match="no codec for content type 'application/xml'"):
        dispatcher.call(f"{peer}/content-type", type="application/xml")


# -- transport ----------------------------------------------------------------------


def test_refused_port_is_a_connect_error(make_dispatcher: Any) -> None:
    d = make_dispatcher()
    with pytest.raises(ConnectError) as info:
        d.call(f"http://127.0.0.1:{free_port()}/multiply", x=1, y=2)
    assert isinstance(info.value, ConnectionError)
    assert not isinstance(info.value, (DispatchTimeout, TimeoutError))
    assert "refused" in str(info.value).lower()


def test_read_timeout_is_bounded(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(timeout=0.3, retry_attempts=1)
    with pytest.raises(DispatchTimeout) as info:
        d.call(f"{peer}/slow", delay=5000)
    assert isinstance(info.value, TimeoutError)
    assert "read timed out" in str(info.value)


def test_keep_alive_one_connection_for_many_calls(dispatcher: Dispatcher, peer: str) -> None:
    dispatcher.call(f"{peer}/stats/reset")
    for i in range(50):
        assert dispatcher.call(f"{peer}/multiply", "GET" if i % 2 else "POST", x=i, y=2) == 2 * i
    stats = peer_stats(dispatcher, peer)
    assert stats == {"connections": 0, "requests": 51}  # reset was sent on the same connection


def test_dropped_connection_get_is_retried_post_is_not(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(retry_attempts=3)
    d.call(f"{peer}/stats/reset")
    with pytest.raises(TransportError, match="connection broken") as info:
        d.call(f"{peer}/drop", "POST")
    assert not isinstance(info.value, ConnectError)
    assert info.value.method == "POST"
    with pytest.raises(TransportError):
        d.call(f"{peer}/drop", "GET")
    assert peer_stats(d, peer)["requests"] == 1 + 3 + 1


@pytest.mark.parametrize("length", [0, 1])
def test_oversized_body_is_refused_with_bounded_memory(
    make_dispatcher: Any, peer: str, length: int
) -> None:
    limit = 1024 * 1024
    d = make_dispatcher(max_response_bytes=limit)
    tracemalloc.start()
    try:
        with pytest.raises(ResponseTooLargeError) as info:
            d.call(f"{peer}/big", bytes=64 * limit, length=length)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.limit == limit
    assert isinstance(info.value, InvalidResponseError)
    assert peak < 4 * limit  # the 64 MiB body was never held
    # The refused connection was dropped, not returned dirty: the next call works.
    assert d.call(f"{peer}/multiply", x=2, y=3) == 6


def test_body_at_the_limit_is_accepted(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(max_response_bytes=100_000)
    with pytest.raises(InvalidResponseError) as info:  # filler is not JSON, but it was read
        d.call(f"{peer}/big", bytes=100_000)
    assert not isinstance(info.value, ResponseTooLargeError)


# -- errors carry context ----------------------------------------------------------


def test_errors_carry_task_method_and_masked_url(dispatcher: Dispatcher, peer: str) -> None:
    url = peer.replace("http://", "http://alice:s3cret@") + "/status/500?token=abc&x=1"
    with pytest.raises(HTTPStatusError) as info:
        dispatcher.apply(url, "GET", {"y": 2}, task_id="t-1")
    error = info.value
    assert (error.task_id, error.method) == ("t-1", "GET")
    assert error.url is not None
    assert "s3cret" not in str(error)
    assert "s3cret" not in error.url
    assert "token=abc" not in str(error)
    assert "alice:***@" in str(error)
    assert "s3cret" not in repr(error.request)


def test_userinfo_is_sent_as_basic_auth(dispatcher: Dispatcher, peer: str) -> None:
    url = peer.replace("http://", "http://alice:s3cret@") + "/echo"
    headers = dispatcher.call(url)["headers"]
    assert headers["authorization"] == "Basic YWxpY2U6czNjcmV0"


def test_errors_pickle_with_their_context(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(RemoteExecuteError) as info:
        dispatcher.apply(f"{peer}/fail500", "POST", {"reason": "nope"}, task_id="t-2")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is RemoteExecuteError
    assert (copy.reason, copy.status, copy.task_id, copy.method) == ("nope", 500, "t-2", "POST")
    assert str(copy) == str(info.value)
    assert copy.request is None  # headers may hold credentials; they stay behind


def test_every_error_type_crosses_process_boundaries_as_itself() -> None:
    """to_dict / error_from_dict (what the Celery executor ships) know every public error."""
    import dispatchkit.exceptions as errors

    public = [getattr(errors, name) for name in errors.__all__]
    types = [t for t in public if isinstance(t, type) and issubclass(t, errors.DispatchError)]
    assert errors.SignatureError in types
    for error_type in types:
        original = error_type.__new__(error_type)
        errors.DispatchError.__init__(original, f"a {error_type.__name__}")
        copy = errors.error_from_dict(original.to_dict())
        assert type(copy) is error_type
        assert copy.message == original.message


def test_an_error_record_with_fields_missing_reads_with_the_defaults() -> None:
    """A record of an older version, or written by hand: every attribute is there."""
    import dispatchkit.exceptions as errors

    for name, error_type in errors._BY_NAME.items():
        copy = errors.error_from_dict({"type": name})
        assert type(copy) is error_type
        assert (copy.message, copy.task_id, copy.method, copy.url) == ("", None, None, None)
        str(copy), repr(copy), copy.to_dict()  # none raises
    assert errors.error_from_dict({"type": "ConnectError"}).transient is True  # type: ignore[attr-defined]
    opened = errors.error_from_dict({"type": "CircuitOpenError", "message": "open"})
    assert (opened.transient, opened.retry_in) == (False, 0.0)  # type: ignore[attr-defined]
    reason = errors.error_from_dict({"type": "RemoteExecuteError", "message": "disk full"})
    assert reason.reason == "disk full"  # type: ignore[attr-defined]
    a, b = (errors.error_from_dict({"type": "HTTPStatusError"}) for _ in range(2))
    assert a.headers == {}  # type: ignore[attr-defined]
    assert a.headers is not b.headers  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([], "an error record must be a mapping, not list"),
        (None, "an error record must be a mapping, not NoneType"),
        ({"type": "HTTPStatusError", "body_excerpt": {"$bytes": 5}}, "latin-1 text, got 5"),
        ({"type": "HTTPStatusError", "body_excerpt": {"$bytes": "\u20ac"}}, "latin-1 text"),
    ],
)
def test_an_error_record_that_cannot_be_one_is_a_usage_error(record: Any, message: str) -> None:
    import dispatchkit.exceptions as errors

    with pytest.raises(UsageError, match=re.escape(message)):
        errors.error_from_dict(record)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([("url", "http://x/")], "a call must be a mapping, not list"),
        ({"url": "http://x/", "bogus": 1}, "a call has no field(s) 'bogus'"),
        ({"method": "GET"}, "a call needs a 'url'"),
    ],
)
def test_a_call_record_that_cannot_be_one_is_a_usage_error(record: Any, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        Call.from_dict(record)


def test_every_error_is_a_dispatch_error(dispatcher: Dispatcher, peer: str) -> None:
    for path in ("/fail", "/status/503", "/invalid/json", "/redirect"):
        with pytest.raises(DispatchError):
            dispatcher.apply(f"{peer}{path}", "POST")


def test_closed_dispatcher_refuses_calls(peer: str) -> None:
    d = Dispatcher()
    d.close()
    d.close()
    with pytest.raises(UsageError, match="closed"):
        d.call(f"{peer}/multiply", x=1, y=1)


def test_keep_alive_off_opens_a_connection_per_call(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(keep_alive=False)
    d.call(f"{peer}/stats/reset")
    for i in range(5):
        assert d.call(f"{peer}/multiply", x=i, y=1) == i
    # reset, five calls and the stats call itself: each on a connection of its own
    assert peer_stats(d, peer) == {"connections": 6, "requests": 6}


def test_errors_raised_before_sending_still_name_the_call(
    dispatcher: Dispatcher, peer: str
) -> None:
    with pytest.raises(EncodeError) as info:
        dispatcher.apply(f"{peer}/echo?token=abc", "POST", {"bad": {}}, task_id="t-9")
    assert (info.value.task_id, info.value.method) == ("t-9", "POST")
    assert info.value.url == f"{peer}/echo?token=***"
    with pytest.raises(UsageError) as bad_method:
        dispatcher.call(f"{peer}/echo", "fetch")
    assert bad_method.value.method == "FETCH"
    assert bad_method.value.task_id


@pytest.mark.parametrize("timeout", ["5", True, float("inf"), float("nan"), -1])
def test_bad_timeouts_are_usage_errors(dispatcher: Dispatcher, peer: str, timeout: Any) -> None:
    with pytest.raises(UsageError, match="timeout"):
        dispatcher.apply(f"{peer}/echo", timeout=timeout)


def test_header_names_are_merged_without_regard_to_case(dispatcher: Dispatcher, peer: str) -> None:
    url = peer.replace("http://", "http://alice:pw@") + "/echo"
    headers = dispatcher.apply(url, headers={"user-agent": "me/1.0", "authorization": "Bearer t"})[
        "headers"
    ]
    assert headers["user-agent"] == "me/1.0"
    assert headers["authorization"] == "Bearer t"  # the explicit header wins over the userinfo
