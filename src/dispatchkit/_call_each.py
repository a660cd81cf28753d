"""``dispatchkit call URL --each FILE``: one call per line of FILE, with progress.

Each line is a JSON object of arguments; ``--concurrency`` calls are in
flight, each retval a JSON line on stdout in input order; docs/cli.md has the
line format, the outputs and the exit statuses.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue
import re
import signal
import stat
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

import orjson

from dispatchkit._cli_output import describe, json_bytes, say
from dispatchkit._dispatcher import Dispatcher
from dispatchkit._encoding import new_task_id
from dispatchkit.exceptions import DispatchError, UsageError

__all__ = ["DEFAULT_CONCURRENCY", "TASK_ID", "run_each", "write_stdout"]

#: Calls in flight unless ``--concurrency`` says otherwise.
DEFAULT_CONCURRENCY = 16
#: The task id travels as the Idempotency-Key header: visible ASCII, bounded.
TASK_ID = re.compile(r"[!-~]{1,200}")
#: Finished lines held back beyond those in flight while an earlier line still runs
#: (outputs go in input order); past it no new call starts until that line ends.
_REORDER = 1024
#: Keys of an input line that are not task arguments. ``$line`` and ``$error`` are what a
#: failures file adds (ignored on input); ``$text`` stands for a line that could not be read.
_RESERVED = frozenset({"$task_id", "$line", "$error", "$text"})
_TICK = 0.1  # seconds between looks at Ctrl-C and redraws of the live progress line
_PLAIN_EVERY = 5.0  # seconds between plain progress lines when stderr is not a terminal
_SHOWN_FAILURES = 5  # failures also told on stderr, one line each; the rest only counted
_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def run_each(
    args: argparse.Namespace, method: str, defaults: dict[str, Any], headers: dict[str, str]
) -> int:
    total = _count_lines(args.each)
    concurrency = args.concurrency or DEFAULT_CONCURRENCY
    with contextlib.ExitStack() as stack:
        failures = None
        if args.failures is not None:
            failures = stack.enter_context(_open_failures(args.failures, args.each))
        dispatcher = stack.enter_context(Dispatcher(timeout=args.timeout, pool_maxsize=concurrency))
        batch = _Batch(dispatcher, args, method, defaults, headers, failures, total)
        return batch.run()


def _count_lines(path: str) -> int | None:
    """The non-blank lines of a regular file, for the progress display; else ``None``.

    A pipe (``-``, ``<(...)``) can be read only once: the reader's.
    """
    if path == "-":
        return None
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise UsageError(f"--each {path!r} is a directory")
        if not stat.S_ISREG(mode):
            return None
        with open(path, "rb") as source:
            return sum(1 for raw in source if raw.strip())
    except OSError as exc:
        raise UsageError(f"cannot read --each {path!r}: {exc.strerror or exc}") from None


def _split_lines(fd: int) -> Iterator[bytes]:
    """The lines read from ``fd``, without their line feeds.

    Read with ``os.read``, not through a buffered file: the reader is a daemon
    thread, and one left blocked inside ``sys.stdin.buffer`` (a stalled pipe,
    then Ctrl-C) holds a lock that the interpreter needs to exit, and aborts it.
    """
    parts: list[bytes] = []  # of a line not yet ended: joined once, however long it is
    while chunk := os.read(fd, 1 << 16):
        end = chunk.rfind(b"\n")
        if end < 0:
            parts.append(chunk)
            continue
        parts.append(chunk[:end])
        yield from b"".join(parts).split(b"\n")
        parts = [chunk[end + 1 :]]
    if last := b"".join(parts):
        yield last


def _open_failures(path: str, each: str) -> IO[bytes]:
    with contextlib.suppress(OSError):
        if each != "-" and os.path.samefile(path, each):
            raise UsageError(f"--failures {path!r} is the --each file: it would be emptied")
    try:
        return open(path, "wb")
    except OSError as exc:
        raise UsageError(f"cannot write --failures {path!r}: {exc.strerror or exc}") from None


@dataclass(slots=True, eq=False)
class _Line:
    """One non-blank input line: the call it asks for, then how that call ended."""

    number: int
    fields: dict[str, Any] | None  # the line's JSON object; None when it could not be read
    text: str = ""  # the line as written, kept only when it could not be read
    task_id: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = None  # set as read when the line is refused: nothing is sent
    called: bool = False  # handed to a worker
    done: bool = False
    retval: Any = None


def _read_line(
    number: int, raw: bytes | str, defaults: Mapping[str, Any], *, inner: bool = False
) -> _Line:
    """The call line ``number`` asks for, or the line refused (``error`` set)."""
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _unreadable(number, raw, f"not JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(fields, dict):
        return _unreadable(number, raw, f"{_JSON_KINDS.get(type(fields), 'null')}, not an object")
    if "$text" in fields:
        text = fields["$text"]
        if inner or not isinstance(text, str) or set(fields) - {"$text", "$line", "$error"}:
            why = '"$text" must be a string, beside "$line" and "$error" only'
            return _unreadable(number, raw, why) if inner else _refused(number, fields, why)
        return _read_line(number, text, defaults, inner=True)
    unknown = sorted(key for key in fields if key.startswith("$") and key not in _RESERVED)
    if unknown:
        why = f"unknown key {unknown[0]!r}: keys starting with $ are reserved"
        return _refused(number, fields, why)
    task_id = fields.get("$task_id")
    if task_id is None:
        task_id = new_task_id()
    elif not (isinstance(task_id, str) and TASK_ID.fullmatch(task_id)):
        return _refused(number, fields, '"$task_id" must be 1 to 200 visible ASCII characters')
    arguments = {key: value for key, value in fields.items() if not key.startswith("$")}
    return _Line(number, fields, task_id=task_id, kwargs={**defaults, **arguments})


def _unreadable(number: int, raw: bytes | str, why: str) -> _Line:
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
    # the message leaves the number out: fed back in, the line fails with the same error
    return _Line(number, None, text=text.rstrip("\r\n"), error=UsageError(why))


def _refused(number: int, fields: dict[str, Any], why: str) -> _Line:
    return _Line(number, fields, error=UsageError(why))


def _failure_record(line: _Line, error: dict[str, Any]) -> dict[str, Any]:
    """The failed line as ``--each`` takes it back: the same call, with the same task id."""
    record: dict[str, Any] = {"$line": line.number}
    if line.fields is None:
        record["$text"] = line.text
    else:
        if line.task_id is not None:
            record["$task_id"] = line.task_id
        # a "$task_id" refused as read stays as it was, and is refused again
        record.update((k, v) for k, v in line.fields.items() if k not in ("$line", "$error"))
    record["$error"] = error
    return record


def _failure_line(line: _Line, error: dict[str, Any]) -> bytes:
    """:func:`_failure_record` as a line of ``--failures``; one whose arguments JSON cannot
    write again keeps its number and error (the input file still holds the line)."""
    try:
        return _dumps(_failure_record(line, error))
    except DispatchError:
        return _dumps({"$line": line.number, "$error": error})


def _error_fields(exc: DispatchError) -> dict[str, Any]:
    fields: dict[str, Any] = {"type": type(exc).__name__, "message": exc.message}
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        fields["status"] = status
    return fields


def _dumps(record: dict[str, Any]) -> bytes:
    return json_bytes(record) + b"\n"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


class _Latencies:
    """Durations counted in buckets 1% wide: percentiles within 1%, in constant memory."""

    _STEP = math.log(1.01)

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0

    def add(self, seconds: float) -> None:
        self._buckets[math.floor(math.log(max(seconds, 1e-6)) / self._STEP)] += 1
        self.count += 1

    def percentile(self, fraction: float) -> float:
        rank, seen, bucket = max(1, math.ceil(fraction * self.count)), 0, 0
        for bucket in sorted(self._buckets):
            seen += self._buckets[bucket]
            if seen >= rank:
                break
        return math.exp((bucket + 0.5) * self._STEP)


class _Progress:
    """Calls done (of how many, when known), failed, and the rate, on stderr.

    On a terminal one line redrawn in place; otherwise a plain line every
    ``_PLAIN_EVERY`` seconds, so that a log is not flooded.
    """

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.live = sys.stderr.isatty()
        self._every = _TICK if self.live else _PLAIN_EVERY
        self._next = time.monotonic() + self._every
        self._drawn = False

    def tick(self, finished: int, failed: int, elapsed: float) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._every
        of = "" if self.total is None else f"/{self.total}"
        rate = f", {finished / elapsed:.1f}/s" if elapsed > 0 else ""
        text = f"{finished}{of} calls, {failed} failed{rate}"
        if self.live:
            sys.stderr.write(f"\r{text}\x1b[K")
            sys.stderr.flush()
            self._drawn = True
        else:
            say(text)

    def clear(self) -> None:
        if self._drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._drawn = False


class _Batch:
    """One ``--each`` run: a reader thread, ``concurrency`` worker threads, and this one.

    The reader parses lines ahead, at most ``concurrency`` of them; this thread
    starts them in input order while fewer than ``concurrency`` are in flight,
    and writes each outcome once every earlier line's is written. Memory stays
    bounded however long the input. The workers are daemon threads, so that a
    second Ctrl-C can leave calls in flight behind.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        args: argparse.Namespace,
        method: str,
        defaults: dict[str, Any],
        headers: dict[str, str],
        failures: IO[bytes] | None,
        total: int | None,
    ) -> None:
        self._dispatcher = dispatcher
        self._url: str = args.url
        self._method = method
        self._headers = headers or None
        self._json: bool = args.json
        self._defaults = defaults
        self._path: str = args.each
        self._concurrency: int = args.concurrency or DEFAULT_CONCURRENCY
        self._grace: float = args.timeout
        self._failures = failures
        self._total = total
        self._progress = _Progress(total)
        self._cond = threading.Condition()
        # all below is guarded by _cond, except what only this (the main) thread touches
        self._inputs: deque[_Line] = deque()  # read, not started
        self._window: deque[_Line] = deque()  # started (or refused), not yet written; in order
        self._calls: queue.SimpleQueue[_Line | None] = queue.SimpleQueue()
        self._in_flight = 0
        self._eof = False  # the reader has ended: at the end of the input, stopped, or failed
        self._read_all = False  # ... at the end of the input
        self._stopping = False  # no new call starts; the reader stops
        self._over = False  # all is written: a call abandoned in flight ends uncounted
        self._reader_error: Exception | None = None
        self._succeeded = 0
        self._failed: Counter[str] = Counter()
        self._latencies = _Latencies()
        # only this thread's (the SIGINT handler runs on it too)
        self._interrupts = 0
        self._stop_reason: str | None = None  # "interrupted", "usage" or "input"
        self._stop_interrupts = 0  # Ctrl-C seen when the stop began; one more ends the wait
        self._wait_until = 0.0  # once stopping, calls in flight are waited for until then
        self._usage: UsageError | None = None
        self._started = 0  # lines taken from the input, refused ones included
        self._last_started = 0  # the number of the last of them
        self._shown = 0
        self._began = time.monotonic()

    # -- this (the main) thread -----------------------------------------------------

    def run(self) -> int:
        reader = threading.Thread(target=self._read, name="dispatchkit-each-reader", daemon=True)
        workers = [
            threading.Thread(target=self._work, name=f"dispatchkit-each-{n}", daemon=True)
            for n in range(self._concurrency)
        ]
        # Ctrl-C only counts, never lands halfway through the bookkeeping; ignored, it stays so
        catch = threading.current_thread() is threading.main_thread()
        catch = catch and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        previous = signal.signal(signal.SIGINT, self._on_sigint) if catch else None
        try:
            reader.start()
            for worker in workers:
                worker.start()
            self._loop()
            abandoned = self._finish()
        finally:
            if catch:  # None: a handler not installed from Python
                signal.signal(
                    signal.SIGINT, signal.default_int_handler if previous is None else previous
                )
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            for _ in workers:
                self._calls.put(None)
        if not abandoned:  # every worker is idle: they end at once
            for thread in (*workers, reader):
                thread.join(_TICK)  # the reader may be blocked on a pipe: not waited for
        if self._usage is not None:
            raise self._usage  # the command line's mistake: exit status 2
        self._report(abandoned)
        if isinstance(self._reader_error, OSError):
            error = self._reader_error
            raise UsageError(f"cannot read --each {self._path!r}: {error.strerror or error}")
        if self._reader_error is not None:
            raise self._reader_error
        # the exit statuses of _cli: EXIT_INTERRUPTED, EXIT_FAILED, EXIT_OK
        if self._stop_reason == "interrupted":
            return 130
        return 1 if self._failed or abandoned else 0

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self._interrupts += 1

    def _loop(self) -> None:
        while True:
            self._check_stop()
            with self._cond:
                if not self._stopping:
                    self._start_calls()
                ready = []
                while self._window and self._window[0].done:
                    ready.append(self._window.popleft())
                ended = self._ended()
                if not (ready or ended):
                    self._cond.wait(_TICK)
                finished, failed = self._succeeded + self._failed.total(), self._failed.total()
            self._write(ready)
            self._progress.tick(finished, failed, time.monotonic() - self._began)
            if ended:
                return

    def _start_calls(self) -> None:
        limit = self._concurrency + _REORDER
        taken = False
        while self._inputs and self._in_flight < self._concurrency and len(self._window) < limit:
            line = self._inputs.popleft()
            self._window.append(line)
            self._started += 1
            self._last_started = line.number
            taken = True
            if line.error is None:
                line.called = True
                self._in_flight += 1
                self._calls.put(line)
            else:
                line.done = True
                self._count(line)
        if taken:
            self._cond.notify_all()  # the reader may go on

    def _ended(self) -> bool:
        if self._stop_reason is None:
            return self._eof and not self._inputs and not self._window
        if self._in_flight == 0:
            return True
        return self._interrupts > self._stop_interrupts or time.monotonic() >= self._wait_until

    def _check_stop(self) -> None:
        if self._stop_reason is not None:
            return
        if self._interrupts:
            reason = "interrupted"
        elif self._usage is not None:
            reason = "usage"
        elif self._reader_error is not None:
            reason = "input"
        else:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            in_flight = self._in_flight
        self._stop_reason = reason
        self._stop_interrupts = self._interrupts
        self._wait_until = time.monotonic() + self._grace
        if reason == "interrupted" and in_flight:
            self._tell(
                f"interrupted: no new call starts; waiting up to {self._grace:g} s for the "
                f"{in_flight} in flight (Ctrl-C again to stop waiting)"
            )

    def _write(self, lines: list[_Line]) -> None:
        out, failures = bytearray(), bytearray()
        for line in lines:
            error = line.error
            record: dict[str, Any] = {"line": line.number, "task_id": line.task_id}
            if error is None:
                try:
                    out += _dumps({**record, "retval": line.retval})
                    continue
                except DispatchError as exc:  # an answer nested too deep to write back
                    error = line.error = exc
            if not isinstance(error, DispatchError):
                raise error  # a bug, not a failed call: shown with its traceback
            record["error"] = _error_fields(error)
            failures += _failure_line(line, record["error"])
            if line.called and isinstance(error, UsageError):
                # the URL, the method, a header: every call would be refused alike
                self._usage = self._usage or error
            else:
                self._show(line.number, error)
            out += _dumps(record)
        if not lines:
            return
        if self._progress.live and sys.stdout.isatty():
            self._progress.clear()
        write_stdout(bytes(out))
        if self._failures is not None and failures:
            self._failures.write(failures)
            self._failures.flush()

    def _show(self, number: int, error: DispatchError) -> None:
        if self._shown < _SHOWN_FAILURES:
            self._tell(f"line {number}: {describe(error)}")
        elif self._shown == _SHOWN_FAILURES:
            where = " and in --failures" if self._failures is not None else ""
            self._tell(f"more failures: each is on stdout{where}, not told here")
        self._shown += 1

    def _finish(self) -> list[_Line]:
        """Write what finished; return the calls still in flight, now abandoned."""
        with self._cond:
            self._over = True
            left = list(self._window)
            self._window.clear()
            done = [line for line in left if line.done]
            abandoned = [line for line in left if not line.done]
        self._write(done)
        if abandoned and self._failures is not None:
            error = {
                "type": "Abandoned",
                "message": "in flight when the batch was interrupted: it may or may not have run",
            }
            self._failures.write(b"".join(_dumps(_failure_record(x, error)) for x in abandoned))
            self._failures.flush()
        return abandoned

    def _report(self, abandoned: list[_Line]) -> None:
        with self._cond:
            succeeded, failed = self._succeeded, Counter(self._failed)
            p50, p95 = (self._latencies.percentile(q) for q in (0.5, 0.95))
            measured = self._latencies.count
            read_all = self._read_all
            not_started: int | None = len(self._inputs)
        if not read_all:
            not_started = None if self._total is None else self._total - self._started
        elapsed = time.monotonic() - self._began
        finished = succeeded + failed.total()
        text = f"{finished} calls in {elapsed:.2f} s"
        if finished and elapsed > 0:
            text += f" ({finished / elapsed:.1f}/s)"
        text += f": {succeeded} succeeded, {failed.total()} failed"
        if failed:  # the most frequent first; ties by name, not by which came first
            ranked = sorted(failed.items(), key=lambda item: (-item[1], item[0]))
            text += " (" + ", ".join(f"{name} {n}" for name, n in ranked) + ")"
        if measured:
            text += f"; latency p50 {_duration(p50)}, p95 {_duration(p95)}"
        self._tell(text)
        if self._stop_reason != "interrupted":
            return
        text = f"interrupted: {finished} calls finished, {len(abandoned)} abandoned in flight"
        if abandoned:
            lines = ", ".join(str(line.number) for line in abandoned)
            text += f" with their outcome unknown (lines {lines})"
        after = f"those after line {self._last_started}" if self._last_started else "all"
        if not_started is None:
            text += f", not started: {after}"
        else:
            text += f", {not_started} lines not started" + (f" ({after})" if not_started else "")
        self._tell(text)

    def _tell(self, text: str) -> None:
        self._progress.clear()
        say(text)

    # -- both sides -------------------------------------------------------------------

    def _count(self, line: _Line) -> None:
        """Count an outcome; under ``_cond``."""
        if line.error is None:
            self._succeeded += 1
        else:
            self._failed[type(line.error).__name__] += 1

    # -- the reader thread --------------------------------------------------------

    def _read(self) -> None:
        try:
            with contextlib.ExitStack() as stack:
                source: Iterable[bytes | str]
                if self._path != "-":
                    fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    stack.callback(os.close, fd)
                    source = _split_lines(fd)
                else:
                    try:
                        source = _split_lines(sys.stdin.fileno())
                    except (AttributeError, OSError, ValueError):  # a stdin with no descriptor
                        source = getattr(sys.stdin, "buffer", sys.stdin)
                for number, raw in enumerate(source, 1):
                    if not raw.strip():
                        continue
                    line = _read_line(number, raw, self._defaults)
                    with self._cond:
                        while len(self._inputs) >= self._concurrency and not self._stopping:
                            self._cond.wait()
                        if self._stopping:
                            return
                        self._inputs.append(line)
                        self._cond.notify_all()
            with self._cond:
                self._read_all = True
        except Exception as exc:  # the main thread stops the batch and tells
            with self._cond:
                self._reader_error = exc
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    # -- the worker threads -----------------------------------------------------------

    def _work(self) -> None:
        apply = self._dispatcher.apply
        while (line := self._calls.get()) is not None:
            started = time.perf_counter()
            try:
                line.retval = apply(
                    self._url,
                    self._method,
                    line.kwargs,
                    headers=self._headers,
                    task_id=line.task_id,
                    json=self._json,
                )
            except Exception as exc:  # a DispatchError fails the line; the main thread judges
                line.error = exc
            elapsed = time.perf_counter() - started
            with self._cond:
                if self._over:
                    return  # abandoned: the report is out, and told this call's outcome is unknown
                line.done = True
                self._in_flight -= 1
                self._latencies.add(elapsed)
                self._count(line)
                self._cond.notify_all()


def write_stdout(data: bytes) -> None:
    out = sys.stdout
    out.flush()
    buffer = getattr(out, "buffer", None)
    if buffer is not None:  # UTF-8, whatever the locale's encoding
        buffer.write(data)
        buffer.flush()
    else:
        out.write(data.decode())
        out.flush()
