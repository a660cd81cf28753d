"""Property tests (hypothesis): codec, envelope and argument encoding.

* Any bytes, under any content type and status, become a value or one of the
  documented errors (``InvalidResponseError`` and its subclasses for a 2xx,
  ``RemoteExecuteError`` / ``HTTPStatusError`` otherwise), never another
  exception: checked on the codec and ``Envelope.from_object`` directly, and
  end to end through a ``Dispatcher`` against a real server.
* Any str, int, float, bool, or non-empty list of those, sent as GET query
  arguments or a POST form, reaches a ``TaskApp`` task annotated with the
  matching types unchanged (floats compared by ``repr``, so NaN, infinities
  and -0.0 count too; ints up to the 4300-digit limit of ``int(str)``).
  Not representable, by design of query and form encoding: an empty list (no
  key is sent, like ``None``). Lone surrogates cannot be UTF-8 encoded: an
  ``EncodeError`` naming the argument is the contract.

The decoder fuzz run for CI is ``test_envelope_decoder_fuzz_run``: hypothesis
rather than atheris, because the decoder is orjson (native code that atheris
cannot instrument without a libFuzzer build, so coverage guidance would see
only our few Python lines), while hypothesis needs no native build, runs inside
pytest under the same warnings-as-errors rules, and shrinks a failure to a
minimal input. Its length is ``DISPATCHKIT_FUZZ_EXAMPLES`` (default 2,000,
about a second); a nightly job can set 100,000 or more.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dispatchkit import (
    Dispatcher,
    EncodeError,
    Envelope,
    HTTPStatusError,
    InvalidResponseError,
    RemoteExecuteError,
    Response,
    UnknownStatusError,
)
from dispatchkit.builtin.codec import JSONCodec, handles
from dispatchkit.server import TaskApp, TaskServer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

#: Examples per property test against a server; the whole file stays well under 20 s.
SERVER_EXAMPLES = 150
FUZZ_EXAMPLES = int(os.environ.get("DISPATCHKIT_FUZZ_EXAMPLES", "2000"))

# No example database: the tests must not write .hypothesis/ into the checkout.
QUICK = settings(max_examples=300, deadline=None, database=None)
AGAINST_SERVER = settings(
    max_examples=SERVER_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ_RUN = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)

CODEC = JSONCodec()


def outcome(func: Callable[..., Any], *args: Any) -> tuple[Any, Exception | None]:
    """``(value, None)`` or ``(None, error)``: lets a property assert on either."""
    try:
        return func(*args), None
    except Exception as exc:
        return None, exc


# -- strategies ------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["success", "failure", "pending", "", "SUCCESS"]) | json_values,
        "retval": json_values,
        "reason": json_values,
    },
)


@st.composite
def mutated(draw: st.DrawFn, source: st.SearchStrategy[bytes]) -> bytes:
    """A valid document, then cut short, or with bytes spliced in."""
    data = draw(source)
    if not data:
        return data
    cut = draw(st.integers(0, len(data)))
    action = draw(st.sampled_from(["truncate", "insert", "replace"]))
    noise = draw(st.binary(min_size=1, max_size=4))
    if action == "truncate":
        return data[:cut]
    if action == "insert":
        return data[:cut] + noise + data[cut:]
    return data[:cut] + noise + data[cut + len(noise) :]


envelope_bytes = envelopes.map(orjson.dumps)
json_bytes = json_values.map(lambda v: orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS))
bodies = (
    st.binary(max_size=300)
    | envelope_bytes
    | json_bytes
    | mutated(envelope_bytes)
    | st.sampled_from(
        [b"", b"null", b"[]", b"{}", b'"success"', b"NaN", b"\xef\xbb\xbf{}", b'{"status":1e400}']
    )
)
content_types = (
    st.none()
    | st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-16",
            "Application/JSON",
            "application/problem+json",
            "text/html; charset=iso-8859-1",
            "text/plain",
            "application/xml",
            "application/octet-stream",
            "",
            ";",
            "*/*",
        ]
    )
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
)


# -- the codec and the envelope, in process ------------------------------------------


@FUZZ_RUN
@given(body=bodies, status=st.integers(100, 599), content_type=content_types)
@example(body=b'{"status": "success"}', status=200, content_type=None)
def test_envelope_decoder_fuzz_run(body: bytes, status: int, content_type: str | None) -> None:
    """JSONCodec.decode: an Envelope or an InvalidResponseError, never another exception."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    envelope, error = outcome(CODEC.decode, Response(status, headers, body))
    if error is not None:
        assert isinstance(error, InvalidResponseError), error
        assert error.body_excerpt == body[:200]
        assert error.status in (None, status)
        return
    obj = orjson.loads(body)
    assert isinstance(obj, dict)
    assert envelope.status == obj["status"]
    assert envelope.status in ("success", "failure")
    if envelope.status == "success":
        assert envelope.retval == obj.get("retval") or _both_nan(envelope.retval, obj["retval"])
    else:
        assert isinstance(envelope.reason, str)


def _both_nan(a: object, b: object) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


@QUICK
@given(obj=envelopes | json_values)
def test_envelope_from_object_accepts_or_raises_invalid(obj: object) -> None:
    envelope, error = outcome(Envelope.from_object, obj, b"quoted")
    if isinstance(error, UnknownStatusError):
        assert isinstance(obj, dict)
        assert obj["status"] not in ("success", "failure")
        return
    if error is not None:
        assert type(error) is InvalidResponseError, error
        assert not isinstance(obj, dict) or "status" not in obj
        assert error.body_excerpt == b"quoted"
        return
    assert isinstance(obj, dict)
    assert envelope.status == obj["status"]
    round_trip = Envelope.from_object(orjson.loads(CODEC.encode(envelope)))
    assert round_trip == envelope


# -- any answer, end to end through a Dispatcher --------------------------------------


def mirror(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Answers with the status, content type and body the request's form asks for."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    form = parse_qs(environ["wsgi.input"].read(length).decode(), keep_blank_values=True)
    status = int(form["status"][0])
    headers = [("Content-Type", form["type"][0])] if "type" in form else []
    start_response(f"{status} Whatever", headers)
    return [form["body"][0].encode("latin-1")]


@pytest.fixture(scope="module")
def mirror_server() -> Iterator[TaskServer]:
    with TaskServer(mirror, port=0) as server:
        yield server


@pytest.fixture(scope="module")
def fuzz_dispatcher() -> Iterator[Dispatcher]:
    with Dispatcher(timeout=5, retry_attempts=1) as d:
        yield d


def expected_outcome(status: int, content_type: str | None, body: bytes) -> tuple[str, Any]:
    """What docs/protocol.md says the call does with this answer: ("value", v) or an error name."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    envelope: Envelope | None = None
    error: str | None = None
    if not handles(media_type):
        error = "InvalidResponseError"
    else:
        try:
            envelope = CODEC.decode(Response(status, {}, body))
        except InvalidResponseError as exc:
            error = type(exc).__name__
    if not 200 <= status < 300:
        if envelope is not None and envelope.status == "failure":
            return ("RemoteExecuteError", envelope.reason)
        return ("HTTPStatusError", status)
    if envelope is None:
        return (error or "InvalidResponseError", None)
    if envelope.status == "failure":
        return ("RemoteExecuteError", envelope.reason)
    return ("value", envelope.retval)


@AGAINST_SERVER
@given(
    body=bodies,
    # 1xx, 204 and 304 carry no body by definition: another test's business
    status=st.integers(200, 599).filter(lambda s: s not in (204, 304)),
    content_type=content_types.filter(lambda t: t is None or t.strip() == t),
)
def test_any_answer_is_a_value_or_a_documented_error(
    mirror_server: TaskServer,
    fuzz_dispatcher: Dispatcher,
    body: bytes,
    status: int,
    content_type: str | None,
) -> None:
    form: dict[str, Any] = {"body": body.decode("latin-1"), "status": status}
    if content_type is not None:
        form["type"] = content_type
    kind, detail = expected_outcome(status, content_type, body)
    retval, error = outcome(fuzz_dispatcher.apply, mirror_server.url, "POST", form)
    if error is not None:
        assert isinstance(error, (InvalidResponseError, RemoteExecuteError, HTTPStatusError))
        assert type(error).__name__ == kind, (error, kind, detail)
        if isinstance(error, RemoteExecuteError):
            assert error.reason == detail
        if isinstance(error, HTTPStatusError):
            assert error.status == status
            assert error.body_excerpt == body[:200]
        return
    assert kind == "value", (retval, kind, detail)
    assert retval == detail or _both_nan(retval, detail)


# -- any arguments round-trip through query and form encoding --------------------------

app = TaskApp()


@app.task
def typed(
    s: str,
    i: int,
    f: float,
    b: bool,
    ls: list[str],
    li: list[int],
    lf: list[float],
    lb: list[bool],
) -> dict[str, Any]:
    """Returns what it received, with each value's type; floats by repr (NaN, -0.0)."""
    return {
        "s": [type(s).__name__, s],
        "i": [type(i).__name__, str(i)],
        "f": [type(f).__name__, repr(f)],
        "b": [type(b).__name__, b],
        "ls": [[type(v).__name__, v] for v in ls],
        "li": [[type(v).__name__, str(v)] for v in li],
        "lf": [[type(v).__name__, repr(v)] for v in lf],
        "lb": [[type(v).__name__, v] for v in lb],
    }


@app.task
def untyped(**received: Any) -> dict[str, Any]:
    """Returns the arguments as received: a str, or a list of str for a repeated key."""
    return received


@pytest.fixture(scope="module")
def task_server() -> Iterator[TaskServer]:
    with app.server(port=0) as server:
        yield server


#: Text that UTF-8 can encode: no lone surrogates (those are EncodeError, tested below).
texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)
#: int(str) refuses more than 4300 digits (CPython's limit), on both sides of the wire.
ints = st.integers() | st.integers(min_value=-(10**4299), max_value=10**4299)
floats = st.floats()  # NaN and the infinities included: compared by repr


def expected_typed(**values: Any) -> dict[str, Any]:
    return {
        "s": ["str", values["s"]],
        "i": ["int", str(values["i"])],
        "f": ["float", repr(values["f"])],
        "b": ["bool", values["b"]],
        "ls": [["str", v] for v in values["ls"]],
        "li": [["int", str(v)] for v in values["li"]],
        "lf": [["float", repr(v)] for v in values["lf"]],
        "lb": [["bool", v] for v in values["lb"]],
    }


@AGAINST_SERVER
@given(
    method=st.sampled_from(["GET", "POST"]),
    s=texts,
    i=ints,
    f=floats,
    b=st.booleans(),
    ls=st.lists(texts, min_size=1, max_size=4),
    li=st.lists(ints, min_size=1, max_size=4),
    lf=st.lists(floats, min_size=1, max_size=4),
    lb=st.lists(st.booleans(), min_size=1, max_size=4),
)
@example(method="GET", s="", i=0, f=-0.0, b=False, ls=[""], li=[-1], lf=[math.nan], lb=[True])
@example(method="POST", s="a&b=c+d%20", i=10**4299, f=math.inf, b=True, ls=["?", "#"],
         li=[2**64], lf=[5e-324], lb=[False])  # fmt: skip
def test_typed_arguments_round_trip(
    task_server: TaskServer, fuzz_dispatcher: Dispatcher, method: str, **values: Any
) -> None:
    tuple_lists = {k: tuple(v) if k == "lb" else v for k, v in values.items()}  # tuples too
    received = fuzz_dispatcher.apply(f"{task_server.url}/typed", method, tuple_lists)
    assert received == expected_typed(**values)


scalars = texts | ints | floats | st.booleans()


def as_sent(value: Any) -> Any:
    """The str a scalar becomes on the wire (docs/protocol.md, Values)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def as_received(value: Any) -> Any:
    """What a ``**kwargs`` task receives: one str, or a list of str for a repeated key."""
    if not isinstance(value, list):
        return as_sent(value)
    return [as_sent(v) for v in value] if len(value) > 1 else as_sent(value[0])


@AGAINST_SERVER
@given(
    method=st.sampled_from(["GET", "POST"]),
    arguments=st.dictionaries(
        texts, scalars | st.lists(scalars, min_size=1, max_size=3), max_size=5
    ),
)
def test_any_argument_names_round_trip(
    task_server: TaskServer, fuzz_dispatcher: Dispatcher, method: str, arguments: dict[str, Any]
) -> None:
    received = fuzz_dispatcher.apply(f"{task_server.url}/untyped", method, arguments)
    assert received == {name: as_received(value) for name, value in arguments.items()}


# -- what cannot be encoded is an EncodeError, before anything is sent -----------------

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


@QUICK
@given(
    method=st.sampled_from(["GET", "POST"]),
    prefix=texts,
    surrogate=surrogates,
    in_name=st.booleans(),
)
def test_lone_surrogates_are_an_encode_error(
    fuzz_dispatcher: Dispatcher, method: str, prefix: str, surrogate: str, in_name: bool
) -> None:
    bad = prefix + surrogate
    arguments = {bad: "v"} if in_name else {"arg": [bad]}
    with pytest.raises(EncodeError) as info:
        # a refused port: were anything sent, this would be a ConnectError instead
        fuzz_dispatcher.apply("http://127.0.0.1:9/t", method, arguments)
    assert info.value.argument == (bad if in_name else "arg")


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_int_too_long_for_str_is_an_encode_error(
    fuzz_dispatcher: Dispatcher, method: str
) -> None:
    with pytest.raises(EncodeError) as info:
        fuzz_dispatcher.apply("http://127.0.0.1:9/t", method, {"n": 10**5000})
    assert info.value.argument == "n"
