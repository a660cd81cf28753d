"""The transport's own head reader against http.client, on the same bytes (hypothesis).

``dispatchkit.builtin._response_head.StrictHeadResponse`` replaces http.client's head
parsing on the hot path. It may only differ where its module docstring says
so: it skips every interim (1xx) answer, and it refuses a head cut off by EOF,
a malformed header line, or a control character in one. Everywhere else it
must agree with ``http.client.HTTPResponse`` on status, reason, version,
headers (values compared the RFC 9110 way: without surrounding whitespace,
an obsolete fold as one space), body framing and the body itself.

Answers are built from parts, so each example knows whether (and where) it was
cut off, which lines are malformed and which interim answers precede the final
one; a second property feeds arbitrary bytes and checks only that the reader
never accepts what http.client refuses.
"""

from __future__ import annotations

import http.client
import io
import re
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchkit.builtin._response_head import MAX_INTERIM, StrictHeadResponse

PROPERTY = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Visible latin-1 and spaces, without \x85: http.client's email parser ends a line
# there (str.splitlines), where HTTP does not (a documented difference).
VALUE_CHARS = st.characters(codec="latin-1", min_codepoint=0x20, exclude_characters="\x7f\x85")


class _Socket:
    """Just enough of a socket for HTTPResponse: ``makefile`` over fixed bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self.data))


@dataclass(frozen=True)
class Parsed:
    status: int
    reason: str
    version: int
    headers: list[tuple[str, str]]
    chunked: bool
    length: int | None
    will_close: bool
    body: bytes | str  # the body, or the name of the error reading it


def parse(cls: type[http.client.HTTPResponse], data: bytes, method: str) -> Parsed | Exception:
    response = cls(_Socket(data), method=method)  # type: ignore[arg-type]
    try:
        response.begin()
    except (http.client.HTTPException, ValueError) as exc:
        return exc
    try:
        body: bytes | str = response.read()
    except (http.client.HTTPException, ValueError) as exc:
        body = type(exc).__name__
    me: Any = response
    return Parsed(
        response.status,
        response.reason,
        response.version,
        list(response.msg.items()),
        me.chunked,
        me.length,
        me.will_close,
        body,
    )


def rfc_value(value: str) -> str:
    """A value as RFC 9110 reads it: folds as one space, no surrounding whitespace."""
    return re.sub(r"[ \t]*\r?\n[ \t]*", " ", value).strip(" \t")


def normalized(parsed: Parsed) -> Parsed:
    headers = [(name, rfc_value(value)) for name, value in parsed.headers]
    return Parsed(**{**parsed.__dict__, "headers": headers})


# -- answers built from parts ------------------------------------------------------------


@dataclass
class Answer:
    data: bytes = b""
    # The same answer for http.client: from the final answer on when an interim one
    # other than 100 precedes it, and with framing values trimmed as RFC 9110 reads
    # them (http.client takes "chunked " for another coding than "chunked").
    reference: bytes = b""
    final_at: int = 0  # where the final answer's status line starts
    head_end: int = 0  # where the final answer's head ends (after its blank line)
    malformed: bool = False  # a header line ours refuses and the email parser skips
    interim: list[int] = field(default_factory=list)
    cut: int | None = None

    @property
    def cut_in_head(self) -> bool:
        return self.cut is not None and self.cut < self.head_end


@st.composite
def header_lines(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """Header lines (with their line ends), the same for the reference, and whether one of
    them is malformed."""
    lines: list[str] = []
    trimmed: list[str] = []
    malformed = False
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["framing", "plain", "plain", "folded", "bad"]))
        end = draw(st.sampled_from(["\r\n", "\r\n", "\n"]))
        ows = st.sampled_from(["", " ", "  ", "\t"])
        if kind == "framing":
            name = draw(
                st.sampled_from(
                    ["Content-Length", "content-length", "Transfer-Encoding", "Connection"]
                )
            )
            value = draw(
                st.sampled_from(
                    ["0", "3", "5", "12", "-1", "abc", "5, 5", "chunked", "CHUNKED",
                     "gzip, chunked", "identity", "close", "keep-alive", "Close"]
                )
            )  # fmt: skip
            before, after = draw(ows), draw(ows)
            lines.append(f"{name}:{before}{value}{after}{end}")
            trimmed.append(f"{name}:{before}{value}{end}")
            continue
        name = draw(st.text(alphabet=TCHAR, min_size=1, max_size=10))
        value = draw(st.text(alphabet=VALUE_CHARS, max_size=16))
        added = [f"{name}:{draw(ows)}{value}{draw(ows)}{end}"]
        if kind == "folded":
            more = draw(st.text(alphabet=VALUE_CHARS, max_size=8))
            indent = draw(st.sampled_from([" ", "\t", "   "]))
            added.append(f"{indent}{more}{end}")
        elif kind == "bad":
            malformed = True
            added.append(
                draw(
                    st.sampled_from(
                        ["no colon here", "Bad Name: v", "X-A : v", "X(A): v", ": empty name",
                         "X-Nul: a\x00b", "X-CR: a\rb"]
                    )
                )
                + end
            )  # fmt: skip
        lines += added
        trimmed += added
    # mypy infers draw's type from `lines` in this `and`: list[str], not bool.
    if lines and draw(st.booleans()) and draw(st.booleans()):  # type: ignore[arg-type]
        for some in (lines, trimmed):
            some.insert(0, " folded first line\r\n")  # a fold with nothing to continue
        malformed = True
    return "".join(lines).encode("latin-1"), "".join(trimmed).encode("latin-1"), malformed


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    answer = Answer()
    parts: list[bytes] = []
    reference: list[bytes] = []
    for _ in range(draw(st.integers(0, 3))):
        status = draw(st.sampled_from([100, 100, 102, 103, 199]))
        lines, trimmed, malformed = draw(header_lines())
        answer.malformed |= malformed
        answer.interim.append(status)
        parts.append(b"HTTP/1.1 %d Interim\r\n" % status + lines + b"\r\n")
        reference.append(b"HTTP/1.1 %d Interim\r\n" % status + trimmed + b"\r\n")
    answer.final_at = sum(map(len, parts))
    if any(status != 100 for status in answer.interim):
        reference = []  # http.client would take the first of them for the final answer
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9"]))
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 400, 404, 500, 503, 599]))
    reason = draw(st.sampled_from([b" OK", b" Whatever Reason", b"", b" "]))
    lines, trimmed, malformed = draw(header_lines())
    answer.malformed |= malformed
    blank = draw(st.sampled_from([b"\r\n", b"\n"]))
    status_line = version + b" %d" % status + reason + b"\r\n"
    parts.append(status_line + lines + blank)
    reference.append(status_line + trimmed + blank)
    answer.head_end = sum(map(len, parts))
    if draw(st.booleans()):
        body = draw(st.binary(max_size=20))
        body = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
    else:
        body = draw(st.binary(max_size=20))
    parts.append(body)
    reference.append(body)
    answer.data, answer.reference = b"".join(parts), b"".join(reference)
    if draw(st.integers(0, 3)) == 0:
        answer.cut = draw(st.integers(0, max(0, len(answer.data) - 1)))
        lost = len(answer.data) - answer.cut  # the same bytes, cut from the same end
        answer.data = answer.data[: answer.cut]
        answer.reference = answer.reference[: max(0, len(answer.reference) - lost)]
    return answer


@PROPERTY
@given(answers(), st.sampled_from(["GET", "POST", "HEAD"]))
def test_head_reader_agrees_with_http_client(answer: Answer, method: str) -> None:
    ours = parse(StrictHeadResponse, answer.data, method)
    reference = parse(http.client.HTTPResponse, answer.reference, method)
    if isinstance(ours, Exception):
        assert isinstance(ours, http.client.HTTPException), repr(ours)
        if isinstance(reference, Exception):
            return  # both refuse
        # Ours may only be stricter where the module docstring says so.
        assert answer.cut_in_head or answer.malformed, (answer, ours, reference)
        return
    assert not isinstance(reference, Exception), (answer, ours, reference)
    assert not answer.cut_in_head
    assert ours == normalized(reference)


@PROPERTY
@given(st.binary(max_size=200), st.sampled_from(["GET", "HEAD"]))
def test_head_reader_never_accepts_what_http_client_refuses(tail: bytes, method: str) -> None:
    data = b"HTTP/1.1 200 OK\r\n" + tail
    ours = parse(StrictHeadResponse, data, method)
    if isinstance(ours, Exception):
        assert isinstance(ours, http.client.HTTPException), repr(ours)
        return
    reference = parse(http.client.HTTPResponse, data, method)
    assert not isinstance(reference, Exception), (data, ours, reference)
    assert ours == normalized(reference)


def test_interim_answers_are_bounded() -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    ours = parse(StrictHeadResponse, interim * MAX_INTERIM + final, "GET")
    assert isinstance(ours, Parsed)
    assert (ours.status, ours.body) == (200, b"ok")
    refused = parse(StrictHeadResponse, interim * (MAX_INTERIM + 1) + final, "GET")
    assert isinstance(refused, http.client.HTTPException)
    assert "interim" in str(refused)


def test_header_count_limit_is_http_clients() -> None:
    """http.client counts every head line, folds and the blank one included."""
    for lines in range(97, 103):
        for folded in (0, 10):
            plain = [b"X-%d: v\r\n" % n for n in range(lines - folded)]
            folds = [b" more\r\n"] * folded
            data = b"HTTP/1.1 200 OK\r\n" + b"".join(plain + folds) + b"\r\n"
            ours = parse(StrictHeadResponse, data, "GET")
            reference = parse(http.client.HTTPResponse, data, "GET")
            assert isinstance(ours, Exception) == isinstance(reference, Exception), (lines, folded)
