"""Reading an answer's head for http.client: strict about truncation, quick about headers.

``http.client.HTTPResponse`` has two habits this module replaces, for the
connections of the built-in transport only:

* it takes a head cut off by the peer closing ("HTTP/1.1 200 O", then EOF; or
  headers that end at EOF without their blank line) for a complete answer;
* it skips only ``100 Continue``: any other interim answer (``102 Processing``,
  ``103 Early Hints``) is returned as the final one, and the real answer stays
  on the connection for the next request to read as its own. RFC 9110 §15.2
  asks a client to parse and discard every 1xx it did not expect; this reader
  does, up to ``MAX_INTERIM`` of them, and refuses a ``101 Switching Protocols``
  that nobody asked for (the connection no longer speaks HTTP/1.1);
* it parses headers with the ``email`` package, which costs about ten
  microseconds per answer, more than the rest of dispatchkit's pipeline.

:class:`StrictHeadResponse` reads the status line and headers itself, with
http.client's limits (line length, header count), into an
``http.client.HTTPMessage`` (so urllib3 and http.client see what they expect),
then frames the body exactly as http.client does.
"""

from __future__ import annotations

import http.client
from typing import Any, cast

_MAX_LINE = 65536
_MAX_HEADERS = 100
_SWITCHING_PROTOCOLS = 101
#: Interim answers skipped before the final one; past this the server is refused.
MAX_INTERIM = 32


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
    while True:
        raw = _line(fp, "header line")
        if raw in (b"\r\n", b"\n"):
            break
        if len(fields) >= _MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
        text = raw.decode("iso-8859-1").rstrip("\r\n")
        if text[:1] in (" ", "\t") and fields:  # obsolete line folding
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {text.strip()}")
            continue
        name, colon, value = text.partition(":")
        if not colon:
            raise http.client.HTTPException(f"malformed header line {text[:100]!r}")
        fields.append((name.strip(), value.strip(" \t")))
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
