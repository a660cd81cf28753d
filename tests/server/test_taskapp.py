"""TaskApp behaviour, exercised over real sockets on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Iterator
from typing import Any, Optional
from urllib.parse import quote, urlencode

import pytest

from dispatchkit.builtin.codec import JSONCodec
from dispatchkit.server import TaskApp, TaskServer

Answer = tuple[int, http.client.HTTPResponse, dict[str, Any]]


def make_app(**options: Any) -> TaskApp:
    app = TaskApp(**options)

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    @app.task(name="add")
    def add_numbers(x: float, y: float = 0.0) -> float:
        return x + y

    @app.task
    def flag(b: bool) -> bool:
        return b

    @app.task
    def echo(s: str) -> str:
        return s

    @app.task
    def total(xs: list[int]) -> int:
        return sum(xs)

    @app.task
    def words(ws: list[str]) -> list[str]:
        return ws

    @app.task
    def bare_list(items: list) -> list:  # type: ignore[type-arg]
        return items

    @app.task
    def maybe(n: int | None = 5) -> int | None:
        return n

    @app.task
    def maybe_old(n: Optional[int]) -> int | None:  # noqa: UP045 - the typing spelling on purpose
        return n

    @app.task
    def maybe_text(s: str | None) -> str | None:
        return s

    @app.task
    def untyped(v):  # type: ignore[no-untyped-def]
        return v

    @app.task
    def anything(v: Any) -> Any:
        return v

    @app.task
    def defaults(x: int = 1, y: str = "d") -> list[object]:
        return [x, y]

    @app.task
    def extras(a: int, **kw: Any) -> dict[str, Any]:
        return {"a": a, "kw": kw}

    @app.task
    def typed_extras(**kw: int) -> dict[str, int]:
        return kw

    @app.task
    def boom() -> None:
        raise ValueError("bad thing")

    @app.task
    def unencodable() -> object:
        return object()

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[TaskServer]:
    with make_app().server(port=0) as server:
        yield server


def request(
    server: TaskServer,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request on a fresh connection; checks what every answer must carry."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("Content-Length") is not None
    if method == "HEAD":
        assert raw == b""
        return response.status, response, {}
    assert int(response.getheader("Content-Length", "-1")) == len(raw)
    return response.status, response, json.loads(raw)


def get(server: TaskServer, task: str, query: str = "") -> Answer:
    return request(server, "GET", f"/{task}?{query}" if query else f"/{task}")


def post_form(server: TaskServer, task: str, fields: Any) -> Answer:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    return request(server, "POST", f"/{task}", urlencode(fields, doseq=True), form)


def post_json(server: TaskServer, path: str, obj: object) -> Answer:
    body = json.dumps(obj)
    return request(server, "POST", path, body, {"Content-Type": "application/json"})


def ok(answer: Answer) -> Any:
    status, _, envelope = answer
    assert (status, envelope["status"]) == (200, "success"), envelope
    return envelope["retval"]


def failed(answer: Answer, status: int) -> str:
    got, _, envelope = answer
    assert got == status, envelope
    assert envelope["status"] == "failure"
    reason: str = envelope["reason"]
    return reason


# -- calling ----------------------------------------------------------------------------


def test_get_query_arguments(server: TaskServer) -> None:
    assert ok(get(server, "multiply", "x=3&y=4")) == 12


def test_post_form_body(server: TaskServer) -> None:
    assert ok(post_form(server, "multiply", {"x": "6", "y": "7"})) == 42


def test_post_json_body(server: TaskServer) -> None:
    assert ok(post_json(server, "/multiply", {"x": 6, "y": 7})) == 42


def test_post_merges_query_and_body_wins(server: TaskServer) -> None:
    assert ok(post_json(server, "/add?x=1&y=100", {"y": 2})) == 3.0
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert ok(request(server, "POST", "/add?x=1&y=100", "y=2", form)) == 3.0


def test_post_without_body_uses_query(server: TaskServer) -> None:
    assert ok(request(server, "POST", "/multiply?x=2&y=5")) == 10


def test_explicit_task_name(server: TaskServer) -> None:
    assert ok(get(server, "add", "x=1.5&y=2")) == 3.5
    failed(get(server, "add_numbers", "x=1"), 404)


def test_percent_encoded_path(server: TaskServer) -> None:
    assert ok(get(server, "multipl%79", "x=2&y=3")) == 6


def test_head_runs_like_get_without_body(server: TaskServer) -> None:
    status, response, _ = request(server, "HEAD", "/multiply?x=2&y=3")
    assert status == 200
    assert response.getheader("Content-Length") == str(len(b'{"status":"success","retval":6}'))


def test_index_lists_task_names(server: TaskServer) -> None:
    names = ok(request(server, "GET", "/"))
    assert names == sorted(names)
    assert {"add", "multiply", "echo"} <= set(names)


# -- conversion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [(v, True) for v in ("true", "1", "yes", "on", "TRUE", "Yes")]
    + [(v, False) for v in ("false", "0", "no", "off", "False", "OFF")],
)
def test_bool_forms(server: TaskServer, text: str, expected: bool) -> None:
    assert ok(get(server, "flag", f"b={text}")) is expected


def test_bool_from_json(server: TaskServer) -> None:
    assert ok(post_json(server, "/flag", {"b": True})) is True
    assert ok(post_json(server, "/flag", {"b": "off"})) is False


@pytest.mark.parametrize(
    ("query", "expected"), [("x=2.5&y=0.5", 3.0), ("x=-1", -1.0), ("x=1e3", 1000.0)]
)
def test_float(server: TaskServer, query: str, expected: float) -> None:
    assert ok(get(server, "add", query)) == expected


def test_json_int_for_float_parameter(server: TaskServer) -> None:
    assert ok(post_json(server, "/add", {"x": 2, "y": 1})) == 3.0


def test_list_from_repeated_keys(server: TaskServer) -> None:
    assert ok(get(server, "total", "xs=1&xs=2&xs=3")) == 6
    assert ok(post_form(server, "total", {"xs": ["4", "5"]})) == 9
    assert ok(get(server, "total", "xs=7")) == 7


def test_list_from_json(server: TaskServer) -> None:
    assert ok(post_json(server, "/total", {"xs": [1, 2, "3"]})) == 6
    assert ok(post_json(server, "/words", {"ws": ["a", "b"]})) == ["a", "b"]


def test_bare_list_keeps_values(server: TaskServer) -> None:
    assert ok(get(server, "bare_list", "items=a&items=2")) == ["a", "2"]
    assert ok(post_json(server, "/bare_list", {"items": [1, {"k": None}]})) == [1, {"k": None}]


def test_optional(server: TaskServer) -> None:
    assert ok(get(server, "maybe")) == 5
    assert ok(get(server, "maybe", "n=7")) == 7
    assert ok(get(server, "maybe", "n=")) is None
    assert ok(post_json(server, "/maybe", {"n": None})) is None
    assert ok(get(server, "maybe_old", "n=3")) == 3
    assert ok(get(server, "maybe_old", "n=")) is None
    failed(get(server, "maybe_old"), 400)


def test_optional_str_keeps_empty_string(server: TaskServer) -> None:
    assert ok(get(server, "maybe_text", "s=")) == ""
    assert ok(post_json(server, "/maybe_text", {"s": None})) is None


def test_unannotated_and_any_are_as_received(server: TaskServer) -> None:
    assert ok(get(server, "untyped", "v=42")) == "42"
    assert ok(get(server, "untyped", "v=a&v=b")) == ["a", "b"]
    assert ok(post_json(server, "/untyped", {"v": {"n": [1, 2]}})) == {"n": [1, 2]}
    assert ok(get(server, "anything", "v=x")) == "x"
    assert ok(post_json(server, "/anything", {"v": 1.5})) == 1.5


def test_defaults(server: TaskServer) -> None:
    assert ok(get(server, "defaults")) == [1, "d"]
    assert ok(get(server, "defaults", "y=z")) == [1, "z"]
    assert ok(post_json(server, "/defaults", {"x": 9})) == [9, "d"]


def test_var_keyword_takes_extra_arguments(server: TaskServer) -> None:
    assert ok(get(server, "extras", "a=1&colour=red&n=2&n=3")) == {
        "a": 1,
        "kw": {"colour": "red", "n": ["2", "3"]},
    }
    assert ok(post_json(server, "/extras", {"a": 1, "deep": {"x": 1}})) == {
        "a": 1,
        "kw": {"deep": {"x": 1}},
    }


def test_var_keyword_annotation_converts(server: TaskServer) -> None:
    assert ok(get(server, "typed_extras", "a=1&b=2")) == {"a": 1, "b": 2}
    assert failed(get(server, "typed_extras", "a=x"), 400) == "argument 'a': invalid int 'x'"


def test_unicode_round_trip(server: TaskServer) -> None:
    text = "grüße ✓ 日本 🙂 a&b=c"
    assert ok(get(server, "echo", "s=" + quote(text))) == text
    assert ok(post_form(server, "echo", {"s": text})) == text
    assert ok(post_json(server, "/echo", {"s": text})) == text


# -- failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "query", "reason"),
    [
        ("multiply", "x=abc&y=1", "argument 'x': invalid int 'abc'"),
        ("multiply", "x=1.5&y=1", "argument 'x': invalid int '1.5'"),
        ("multiply", "x=1", "missing argument 'y'"),
        ("multiply", "x=1&y=2&z=3", "unexpected argument 'z'"),
        ("multiply", "x=1&x=2&y=3", "argument 'x': expected one value, got 2"),
        ("add", "x=fast", "argument 'x': invalid float 'fast'"),
        ("flag", "b=maybe", "argument 'b': invalid bool 'maybe'"),
        ("total", "xs=1&xs=two", "argument 'xs': invalid int 'two'"),
        ("maybe", "n=seven", "argument 'n': invalid int 'seven'"),
    ],
)
def test_bad_arguments_are_400_naming_the_argument(
    server: TaskServer, task: str, query: str, reason: str
) -> None:
    assert failed(get(server, task, query), 400) == reason


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"x": "abc", "y": 1}, "argument 'x': invalid int 'abc'"),
        ({"x": 1.5, "y": 1}, "argument 'x': invalid int 1.5"),
        ({"x": True, "y": 1}, "argument 'x': invalid int True"),
        ({"x": None, "y": 1}, "argument 'x': invalid int None"),
        ({"x": 1}, "missing argument 'y'"),
        ({"x": 1, "y": 2, "q": 0}, "unexpected argument 'q'"),
    ],
)
def test_bad_json_arguments_are_400(server: TaskServer, obj: object, reason: str) -> None:
    assert failed(post_json(server, "/multiply", obj), 400) == reason


def test_str_parameter_rejects_json_number(server: TaskServer) -> None:
    assert failed(post_json(server, "/echo", {"s": 5}), 400) == "argument 's': invalid str 5"


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b'{"x": 1', "application/json", "invalid JSON body"),
        (b"[1, 2]", "application/json", "the JSON body must be an object"),
        (b"x=%ff&y=1", "application/x-www-form-urlencoded", "the form body is not UTF-8"),
        (b"x=\xff", "application/x-www-form-urlencoded", "the form body is not UTF-8"),
    ],
)
def test_invalid_body_is_400(
    server: TaskServer, body: bytes, content_type: str, reason: str
) -> None:
    answer = request(server, "POST", "/multiply", body, {"Content-Type": content_type})
    assert failed(answer, 400).startswith(reason)


def test_query_not_utf8_is_400(server: TaskServer) -> None:
    assert failed(get(server, "echo", "s=%ff"), 400) == "the query string is not UTF-8"


def test_unsupported_content_type_is_415(server: TaskServer) -> None:
    answer = request(server, "POST", "/echo", b"s=1", {"Content-Type": "text/plain"})
    assert "unsupported Content-Type" in failed(answer, 415)


def test_unknown_task_is_404(server: TaskServer) -> None:
    assert failed(get(server, "nope"), 404) == "unknown task 'nope'"
    assert failed(get(server, "multiply/extra"), 404) == "unknown task 'multiply/extra'"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405_with_allow(server: TaskServer, method: str) -> None:
    status, response, envelope = request(server, method, "/multiply?x=1&y=2")
    assert (status, envelope["status"]) == (405, "failure")
    assert response.getheader("Allow") == "GET, HEAD, POST"


def test_index_allows_get_only(server: TaskServer) -> None:
    status, response, _ = request(server, "POST", "/")
    assert status == 405
    assert response.getheader("Allow") == "GET, HEAD"


def test_task_exception_is_500_and_logged(
    server: TaskServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="dispatchkit.server"):
        assert failed(get(server, "boom"), 500) == "ValueError: bad thing"
    (record,) = [r for r in caplog.records if r.name == "dispatchkit.server"]
    assert record.exc_info is not None
    assert "boom" in record.getMessage()


def test_unencodable_return_value_is_500(
    server: TaskServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.CRITICAL, logger="dispatchkit.server"):
        reason = failed(get(server, "unencodable"), 500)
    assert reason.startswith("cannot encode the return value: TypeError: ")


def test_body_over_limit_is_413() -> None:
    with make_app(max_body_bytes=64).server(port=0) as small:
        answer = post_json(small, "/echo", {"s": "x" * 100})
        assert failed(answer, 413) == "request body exceeds 64 bytes"
        assert ok(post_json(small, "/echo", {"s": "fits"})) == "fits"


# -- the app object ---------------------------------------------------------------------


class _VendorCodec(JSONCodec):
    media_type = "application/vnd.example+json"


def test_codec_sets_content_type() -> None:
    app = TaskApp(codec=_VendorCodec())
    app.task(lambda: 1, name="one")
    with app.server() as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        try:
            conn.request("GET", "/one")
            response = conn.getresponse()
            assert json.loads(response.read()) == {"status": "success", "retval": 1}
        finally:
            conn.close()
    assert response.getheader("Content-Type") == "application/vnd.example+json"


def test_tasks_is_a_read_only_mapping() -> None:
    app = make_app()
    assert app.tasks["add"].__name__ == "add_numbers"
    assert "multiply" in app.tasks
    with pytest.raises(TypeError):
        app.tasks["x"] = print  # type: ignore[index]


def test_task_returns_the_function_unchanged() -> None:
    app = TaskApp()

    def f(x: int) -> int:
        return x

    assert app.task(f) is f
    assert app.task(name="g")(f) is f
    assert list(app.tasks) == ["f", "g"]


def test_duplicate_name_is_value_error() -> None:
    app = make_app()
    with pytest.raises(ValueError, match="already registered"):
        app.task(lambda: None, name="multiply")


@pytest.mark.parametrize("name", ["", "a/b", "sp ace", "<lambda>", "grüße"])
def test_bad_name_is_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="URL-safe"):
        TaskApp().task(lambda: None, name=name)


def test_lambda_needs_a_name() -> None:
    with pytest.raises(ValueError, match="pass name="):
        TaskApp().task(lambda: None)


def test_unservable_signatures_are_type_errors() -> None:
    app = TaskApp()

    def takes_dict(d: dict[str, int]) -> None: ...

    def positional(x: int, /) -> None: ...

    def union(x: int | str) -> None: ...

    async def async_dict(d: dict[str, int]) -> None: ...

    with pytest.raises(TypeError, match="'d': unsupported annotation"):
        app.task(takes_dict)
    with pytest.raises(TypeError, match="positional-only"):
        app.task(positional)
    with pytest.raises(TypeError, match="unsupported annotation"):
        app.task(union)
    with pytest.raises(TypeError, match="'d': unsupported annotation"):
        app.task(async_dict)  # an async task's signature is checked alike
    assert not app.tasks


def test_negative_body_limit_is_value_error() -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        TaskApp(max_body_bytes=-1)
