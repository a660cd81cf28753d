"""Reading an answer's head for http.client: strict where it is lax, quick about headers.

``http.client.HTTPResponse`` has habits this module replaces, for the
connections of the built-in transport only. :class:`StrictHeadResponse` reads
the status line and headers itself, with http.client's limits (line length,
header count), into an ``http.client.HTTPMessage`` (so urllib3 and http.client
see what they expect), then frames the body exactly as http.client does. Where
it differs from http.client, and only there (``tests/test_head_parity.py``
checks every other answer against http.client byte for byte):

* **Interim answers.** http.client skips only ``100 Continue``: any other 1xx
  (``102 Processing``, ``103 Early Hints``) is returned as the final answer,
  and the real one stays on the connection for the next request to read as its
  own. RFC 9110 §15.2 asks a client to parse and discard every 1xx it did not
  expect; this reader does, up to ``MAX_INTERIM`` of them, and refuses a
  ``101 Switching Protocols`` nobody asked for (the connection no longer speaks
  HTTP/1.1).
* **Truncation (stricter).** http.client takes a head cut off by the peer
  closing ("HTTP/1.1 200 O", then EOF; headers that end at EOF without their
  blank line) for a complete answer; here it is an ``IncompleteRead``.
* **Malformed header lines (stricter).** http.client hands the head to the
  ``email`` parser, which silently stops at a line that is not a header (no
  colon, whitespace before the colon, a name that is not a token, a folded
  first line) and drops every header after it; here such a head is refused,
  and so is a value holding a bare CR or a NUL (RFC 9110 §5.5). The ``email``
  parser also ends a line at characters HTTP does not (``\x85`` and other
  ``str.splitlines`` breaks); here only LF ends a line.
* **Values (RFC 9110 §5.5, RFC 9112 §5.2).** Leading and trailing whitespace
  is not part of a value, and an obsolete line fold becomes one space;
  http.client keeps trailing whitespace and the CRLF of a fold. Framing
  follows: ``Transfer-Encoding: chunked `` (a trailing space) is chunked here,
  while http.client takes it for another coding and frames by
  ``Content-Length`` instead.
* **Speed.** The ``email`` parser costs about ten microseconds per answer, more
  than the rest of dispatchkit's pipeline.
"""

from __future__ import annotations

import http.client
import re
from typing import Any, cast

_MAX_LINE = 65536
_MAX_HEADERS = 100
_SWITCHING_PROTOCOLS = 101
#: Interim answers skipped before the final one; past this the server is refused.
MAX_INTERIM = 32
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _line(fp: Any, what: str) -> bytes:
    line: bytes = fp.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise http.client.LineTooLong(what)
    if not line.endswith(b"\n"):
        # EOF in the middle of a line, or where a line (or the blank line) was due.
        raise http.client.IncompleteRead(line)
    return line


def read_headers(fp: Any) -> http.client.HTTPMessage:
    """Read header lines up to the blank line; a folded line continues the one before."""
    fields: list[tuple[str, str]] = []
    for count in range(1, _MAX_HEADERS + 2):
        raw = _line(fp, "header line")
        if count > _MAX_HEADERS:  # http.client counts every line, the blank one too
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
        if raw in (b"\r\n", b"\n"):
            break
        text = raw[: -2 if raw.endswith(b"\r\n") else -1].decode("iso-8859-1")
        if "\r" in text or "\0" in text:
            raise http.client.HTTPException(f"control character in header line {text[:100]!r}")
        if text[:1] in (" ", "\t") and fields:  # obsolete line folding
            name, value = fields[-1]
            folded = text.strip(" \t")
            fields[-1] = (name, f"{value} {folded}".strip(" \t"))
            continue
        name, colon, value = text.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise http.client.HTTPException(f"malformed header line {text[:100]!r}")
        fields.append((name, value.strip(" \t")))
    message = http.client.HTTPMessage()
    message._headers = fields  # type: ignore[attr-defined]  # email.message's own list
    return message


class UnaskedSwitch(http.client.HTTPException):
    """A ``101 Switching Protocols`` answer to a request that asked for no upgrade."""


class StrictHeadResponse(http.client.HTTPResponse):
    """An ``HTTPResponse`` whose head must arrive whole; see the module docstring."""

    def begin(self) -> None:
        if self.headers is not None:
            return
        for _ in range(MAX_INTERIM + 1):
            version, status, reason = self._read_status()
            if status >= 200:  # http.client refuses anything outside 100-999
                break
            if status == _SWITCHING_PROTOCOLS:
                raise UnaskedSwitch(f"101 Switching Protocols without an Upgrade request: {reason}")
            read_headers(self.fp)  # an interim answer's head: read whole, then dropped
        else:
            raise http.client.HTTPException(f"more than {MAX_INTERIM} interim (1xx) answers")
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        headers = read_headers(self.fp)
        self.headers = self.msg = headers
        self._frame(headers, status)

    def _frame(self, headers: http.client.HTTPMessage, status: int) -> None:
        """Chunked, a length, or up to the close: http.client's rules, unchanged."""
        me = cast(Any, self)
        encoding = headers.get("transfer-encoding")
        me.chunked = encoding is not None and encoding.lower() == "chunked"
        if me.chunked:
            me.chunk_left = None
        me.will_close = self._check_close()  # type: ignore[attr-defined]
        me.length = None
        length = headers.get("content-length")
        if length and not me.chunked:
            try:
                me.length = int(length)
            except ValueError:
                me.length = None
            else:
                if me.length < 0:
                    me.length = None
        if status in (204, 304) or 100 <= status < 200 or me._method == "HEAD":
            me.length = 0
        if not me.will_close and not me.chunked and me.length is None:
            me.will_close = True
