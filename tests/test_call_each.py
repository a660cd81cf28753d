"""``dispatchkit call URL --each FILE``: one call per line, against real servers on loopback.

The server counts what it receives (task ids, requests at once), so every
test checks what was sent, not only what the command says it sent.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from dispatchkit import _call_each
from dispatchkit._cli import main
from dispatchkit.server import TaskApp, TaskServer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

TIMEOUT = 60.0  # bound on any one wait; none comes near it
SUMMARY = re.compile(
    r"^dispatchkit: (?P<calls>\d+) calls in [\d.]+ s(?: \([\d.]+/s\))?: "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed(?: \((?P<types>[^)]*)\))?"
    r"(?:; latency p50 (?P<p50>[\d.]+ m?s), p95 (?P<p95>[\d.]+ m?s))?$",
    re.MULTILINE,
)
INTERRUPTED = re.compile(
    r"^dispatchkit: interrupted: (?P<finished>\d+) calls finished, "
    r"(?P<abandoned>\d+) abandoned in flight"
    r"(?: with their outcome unknown \(lines (?P<lines>[\d, ]+)\))?"
    r", (?P<not_started>\d+) lines not started",
    re.MULTILINE,
)
TASK_ID = re.compile(r"[0-9a-f]{32}")
POSIX_SIGNALS = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class Gauge:
    """WSGI middleware: what arrived (task id, method, X-Trace) and the most requests at once."""

    def __init__(self) -> None:
        self.app = make_app(self)
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.received: list[tuple[str, str, str | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        #: How far the input had been read when a request arrived, less the requests so far.
        self.probe: Callable[[], int] | None = None
        self.max_ahead = 0
        #: What the task ``hold`` waits for; each test has its own.
        self.release = threading.Event()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        read = self.probe() if self.probe is not None else 0  # read before counting: a bound
        with self.lock:
            self.received.append(
                (
                    str(environ.get("HTTP_IDEMPOTENCY_KEY", "")),
                    str(environ["REQUEST_METHOD"]),
                    environ.get("HTTP_X_TRACE"),
                )
            )
            self.max_ahead = max(self.max_ahead, read - len(self.received))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self.app(environ, start_response)
        finally:
            with self.lock:
                self.in_flight -= 1

    @property
    def task_ids(self) -> list[str]:
        with self.lock:
            return [key for key, _, _ in self.received]

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while len(self.task_ids) < count:
            assert time.monotonic() < deadline, f"the server saw {len(self.task_ids)} calls"
            time.sleep(0.01)


def make_app(gauge: Gauge) -> TaskApp:
    app = TaskApp()

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    @app.task
    def echo(a: Any = None, b: Any = None) -> dict[str, Any]:
        return {"a": a, "b": b}

    @app.task
    def nap(ms: int = 0, fail: bool = False) -> int:
        time.sleep(ms / 1000)
        if fail:
            raise RuntimeError(f"failed after {ms} ms")
        return ms

    @app.task
    def hold() -> str:
        gauge.release.wait(TIMEOUT)  # until the test lets go
        return "released"

    return app


@dataclass
class Server:
    base: str
    gauge: Gauge


@pytest.fixture(scope="module")
def task_server() -> Iterator[Server]:
    gauge = Gauge()
    with TaskServer(gauge, port=0) as served:
        try:
            yield Server(served.url, gauge)
        finally:
            gauge.release.set()


@pytest.fixture
def server(task_server: Server) -> Iterator[Server]:
    """The module's server, its counters reset for the test."""
    task_server.gauge.reset()
    try:
        yield task_server
    finally:
        task_server.gauge.release.set()  # a call held by the test ends now


def write_lines(path: Path, *lines: str | dict[str, Any]) -> str:
    """Write one line per item (a dict as JSON); return the path as an argument."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    """``main(argv)`` in this process: the status, the JSON lines on stdout, stderr."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, [json.loads(line) for line in out.splitlines()], err


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def summary(err: str) -> dict[str, str]:
    match = SUMMARY.search(err)
    assert match, err
    return {key: value for key, value in match.groupdict().items() if value is not None}


def seconds(shown: str) -> float:
    number, unit = shown.split()
    return float(number) / (1000 if unit == "ms" else 1)


# -- what comes out -------------------------------------------------------------------


def test_outputs_come_in_input_order_with_line_numbers(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the first call is the slowest: the ones after it finish first, and wait for it
    naps = [300, 0, 50, 0, 0, 20, 0, 0]
    lines: list[str | dict[str, Any]] = []
    for ms in naps:
        lines += [{"ms": ms}, ""]  # blank lines are skipped, and still numbered
    each = write_lines(tmp_path / "calls.jsonl", *lines)
    status, outputs, err = run(
        capsys, "call", f"{server.base}/nap", "--each", each, "--concurrency", "4"
    )
    assert status == 0, err
    assert [o["line"] for o in outputs] == [1, 3, 5, 7, 9, 11, 13, 15]
    assert [o["retval"] for o in outputs] == naps
    assert all(TASK_ID.fullmatch(o["task_id"]) for o in outputs)
    # every call was sent once, with the task id reported for its line
    assert sorted(server.gauge.task_ids) == sorted(o["task_id"] for o in outputs)
    assert summary(err)["calls"] == "8"


def test_command_line_arguments_are_defaults_each_line_overrides(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    each = write_lines(tmp_path / "calls.jsonl", {"b": "x"}, {}, {"a": None, "$task_id": "t-3"})
    argv = ["call", f"{server.base}/echo", "a=1", "b=2", "--each", each, "-H", "X-Trace: on"]
    status, outputs, _ = run(capsys, *argv, "-X", "POST")
    assert status == 0
    assert [o["retval"] for o in outputs] == [
        {"a": "1", "b": "x"},
        {"a": "1", "b": "2"},
        {"a": None, "b": "2"},  # null leaves the argument out, as it does in Python
    ]
    assert outputs[2]["task_id"] == "t-3"
    # the method and the headers go with every call
    assert [(method, trace) for _, method, trace in server.gauge.received] == [("POST", "on")] * 3
    assert "t-3" in server.gauge.task_ids


def test_with_json_values_are_sent_as_the_line_has_them(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    each = write_lines(tmp_path / "calls.jsonl", {"b": {"k": [1, True]}}, {"a": "12"})
    status, outputs, _ = run(
        capsys, "call", "--json", f"{server.base}/echo", "a=12", "--each", each
    )
    assert status == 0
    assert [o["retval"] for o in outputs] == [
        {"a": 12, "b": {"k": [1, True]}},
        {"a": "12", "b": None},
    ]


def test_stdin_is_read_with_a_dash(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"x": 2}\n\n{"x": 3}\n')))
    status, outputs, _ = run(capsys, "call", f"{server.base}/multiply", "y=7", "--each", "-")
    assert status == 0
    assert [(o["line"], o["retval"]) for o in outputs] == [(1, 14), (3, 21)]


class Tape:
    """A stdin that counts the lines read from it."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self.read = 0

    @property
    def buffer(self) -> Tape:
        return self

    def __iter__(self) -> Iterator[bytes]:
        for line in self.lines:
            self.read += 1
            yield line


def test_the_input_is_streamed_not_read_up_front(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tape = Tape([b'{"ms": 1}\n'] * 150)
    monkeypatch.setattr(sys, "stdin", tape)
    server.gauge.probe = lambda: tape.read
    status, outputs, _ = run(
        capsys, "call", f"{server.base}/nap", "--each", "-", "--concurrency", "2"
    )
    assert (status, len(outputs)) == (0, 150)
    # read ahead: at most 2 lines waiting to start, 2 started but not yet arrived, 1 parsed
    assert server.gauge.max_ahead <= 2 * 2 + 1


# -- failures -------------------------------------------------------------------------


def test_bad_lines_fail_with_their_line_numbers(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    each = write_lines(
        tmp_path / "calls.jsonl",
        {"x": 2},
        "not json",
        "",
        "[1, 2]",
        {"$bogus": 1, "x": 1},
        {"$task_id": "two words", "x": 1},
        {"$text": 5},
        {"x": 3},
    )
    status, outputs, err = run(capsys, "call", f"{server.base}/multiply", "y=7", "--each", each)
    assert status == 1
    assert [o["line"] for o in outputs] == [1, 2, 4, 5, 6, 7, 8]
    assert [o.get("retval") for o in outputs] == [14, None, None, None, None, None, 21]
    errors = {o["line"]: o["error"] for o in outputs if "error" in o}
    assert {error["type"] for error in errors.values()} == {"UsageError"}
    assert "not JSON" in errors[2]["message"]
    assert "an array, not an object" in errors[4]["message"]
    assert "'$bogus'" in errors[5]["message"]
    assert '"$task_id"' in errors[6]["message"]
    assert '"$text"' in errors[7]["message"]
    assert {o["line"]: o["task_id"] for o in outputs}[2] is None  # never read: no task id
    assert "dispatchkit: line 2: UsageError: not JSON" in err
    assert summary(err) == {
        "calls": "7",
        "succeeded": "2",
        "failed": "5",
        "types": "UsageError 5",
        "p50": summary(err)["p50"],
        "p95": summary(err)["p95"],
    }
    assert len(server.gauge.task_ids) == 2  # a refused line sends nothing


def test_the_failures_file_fed_back_reproduces_the_failed_calls(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    each = write_lines(
        tmp_path / "calls.jsonl",
        {"x": 1, "y": 2},
        {"x": "one", "y": 2},
        {"$task_id": "order-7", "x": "seven"},
        "not json",
        {"x": 3, "y": 4, "$task_id": "order-8"},
        {"x": 1.5},
        "",
        '{"x": 2, "y": 3}',
    )
    first, second = tmp_path / "failures.jsonl", tmp_path / "failures-2.jsonl"
    url = f"{server.base}/multiply"
    status, outputs, _ = run(capsys, "call", url, "y=5", "--each", each, "--failures", str(first))
    assert status == 1
    failed = [o for o in outputs if "error" in o]
    assert [o["line"] for o in failed] == [2, 3, 4, 6]
    records = read_jsonl(first)
    assert [r["$line"] for r in records] == [2, 3, 4, 6]
    assert [r.get("$task_id") for r in records] == [o["task_id"] for o in failed]
    assert records[1] == {
        "$line": 3,
        "$task_id": "order-7",
        "x": "seven",  # the line's own arguments: the command line's come again on a re-run
        "$error": {
            "type": "RemoteExecuteError",
            "message": "argument 'x': invalid int 'seven'",
            "status": 400,
        },
    }
    assert records[2]["$text"] == "not json"
    server.gauge.received.clear()

    status, again, _ = run(
        capsys, "call", url, "y=5", "--each", str(first), "--failures", str(second)
    )
    assert status == 1
    # the same calls, with the same task ids (so the same Idempotency-Key), and nothing else
    assert [o["task_id"] for o in again] == [o["task_id"] for o in failed]
    assert [o["error"] for o in again] == [o["error"] for o in failed]
    # the line that is not JSON was refused again, and not sent
    assert sorted(server.gauge.task_ids) == sorted(o["task_id"] for o in failed if o["task_id"])
    assert len(server.gauge.task_ids) == 3
    # and fail the same way: the failures file is the same, but for the line numbers
    assert [{k: v for k, v in r.items() if k != "$line"} for r in read_jsonl(second)] == [
        {k: v for k, v in r.items() if k != "$line"} for r in records
    ]


def test_summary_tells_failures_by_type_and_latencies(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    naps: list[dict[str, Any]] = [{"ms": 50}] * 6 + [{"ms": 50, "fail": True}] * 2
    each = write_lines(tmp_path / "calls.jsonl", *naps, "{")
    status, outputs, err = run(capsys, "call", f"{server.base}/nap", "--each", each)
    assert status == 1
    shown = summary(err)
    assert (shown["calls"], shown["succeeded"], shown["failed"]) == ("9", "6", "3")
    assert shown["types"] == "RemoteExecuteError 2, UsageError 1"
    # every call took its 50 ms nap at least (the figures are within 1%)
    assert seconds(shown["p95"]) >= seconds(shown["p50"]) >= 0.049
    assert err.count("RemoteExecuteError (HTTP 500): RuntimeError: failed after 50 ms") == 2
    assert len(outputs) == 9


def test_only_the_first_failures_are_told_on_stderr(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    each = write_lines(tmp_path / "calls.jsonl", *["nope"] * 8)
    status, outputs, err = run(capsys, "call", f"{server.base}/nap", "--each", each)
    assert (status, len(outputs)) == (1, 8)
    told = re.findall(r"^dispatchkit: line (\d+): ", err, re.MULTILINE)
    assert told == ["1", "2", "3", "4", "5"]
    assert "more failures: each is on stdout, not told here" in err


# -- exit statuses and usage --------------------------------------------------------


def test_all_succeeded_exits_0_and_an_empty_input_too(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    each = write_lines(tmp_path / "calls.jsonl", {"x": 1})
    failures = tmp_path / "failures.jsonl"
    argv = ["call", f"{server.base}/multiply", "y=1", "--each", each, "--failures", str(failures)]
    assert run(capsys, *argv)[0] == 0
    assert failures.read_text() == ""  # written, and empty: nothing to run again
    empty = write_lines(tmp_path / "empty.jsonl", "", "  ")
    status, outputs, err = run(capsys, "call", f"{server.base}/multiply", "--each", empty)
    assert (status, outputs) == (0, [])
    assert summary(err)["calls"] == "0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{url}", "--each", "{missing}"], "cannot read --each"),
        (["{url}", "--each", "{tmp}"], "is a directory"),
        (["{url}", "--each", "{each}", "--task-id", "t1"], "--task-id names one call"),
        (["{url}", "--concurrency", "2"], "--concurrency needs --each"),
        (["{url}", "--failures", "{tmp}/f.jsonl"], "--failures needs --each"),
        (["{url}", "--each", "{each}", "--failures", "{each}"], "it would be emptied"),
        (["{url}", "--each", "{each}", "--failures", "{missing}/f"], "cannot write --failures"),
        (["{url}", "--each", "{each}", "--json", "-X", "GET"], "--json needs a method with a body"),
        (["{url}", "--each", "{each}", "-H", "Idempotency-Key: 1"], "use --task-id"),
        # the URL is the command line's: every call would be refused alike
        (["http:///multiply", "--each", "{each}"], "URL has no host"),
        (["ftp://127.0.0.1/multiply", "--each", "{each}"], "no transport for scheme 'ftp'"),
    ],
)
def test_bad_usage_exits_2(
    argv: list[str],
    message: str,
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    each = write_lines(tmp_path / "calls.jsonl", {"x": 1, "y": 2}, {"x": 2, "y": 2})
    values = {"url": f"{server.base}/multiply", "each": each, "tmp": str(tmp_path)}
    values["missing"] = str(tmp_path / "missing")
    status, _, err = run(capsys, "call", *[arg.format(**values) for arg in argv])
    assert status == 2
    assert err.splitlines()[-1].startswith("dispatchkit: ")
    assert message in err
    assert Path(each).read_text() != ""  # --failures never empties the input
    assert server.gauge.task_ids == []


@pytest.mark.parametrize("value", ["0", "-1", "1025", "many"])
def test_concurrency_out_of_range_is_an_argparse_error(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    each = write_lines(tmp_path / "calls.jsonl", {})
    status = main(["call", "http://127.0.0.1:1/x", "--each", each, "--concurrency", value])
    assert status == 2
    assert "argument --concurrency" in capsys.readouterr().err


# -- concurrency and progress ---------------------------------------------------------


def test_concurrency_bounds_the_calls_in_flight_at_the_server(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    each = write_lines(tmp_path / "calls.jsonl", *[{"ms": 100}] * 24)
    argv = ["call", f"{server.base}/nap", "--each", each, "--concurrency", "4"]
    status, outputs, _ = run(capsys, *argv)
    assert (status, len(outputs)) == (0, 24)
    assert server.gauge.max_in_flight == 4


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_live_line_on_a_terminal(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    each = write_lines(tmp_path / "calls.jsonl", *[{"ms": 60}] * 10)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    argv = ["call", f"{server.base}/nap", "--each", each, "--concurrency", "2"]
    assert main(argv) == 0
    err = terminal.getvalue()
    assert re.search(r"\r\d+/10 calls, 0 failed, [\d.]+/s\x1b\[K", err), repr(err)
    # the live line is wiped before the summary, which has a line of its own
    assert "\r\x1b[Kdispatchkit: 10 calls in " in err
    assert err.endswith("\n")


def test_progress_is_a_plain_line_now_and_then_elsewhere(
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_call_each, "_PLAIN_EVERY", 0.0)  # every look, instead of every 5 s
    each = write_lines(tmp_path / "calls.jsonl", *[{"ms": 20}] * 6)
    status, _, err = run(capsys, "call", f"{server.base}/nap", "--each", each)
    assert status == 0
    assert re.search(r"^dispatchkit: \d+/6 calls, 0 failed, [\d.]+/s$", err, re.MULTILINE)
    assert "\r" not in err


# -- Ctrl-C, in a real process ----------------------------------------------------------


def start(*argv: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUTF8="1")
    return subprocess.Popen(
        [sys.executable, "-m", "dispatchkit", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=env,
    )


def pump(stream: IO[str], lines: queue.Queue[str]) -> threading.Thread:
    def read() -> None:
        for line in stream:
            lines.put(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)
    return out, err


@POSIX_SIGNALS
def test_ctrl_c_starts_no_new_call_and_lets_those_in_flight_finish(
    server: Server, tmp_path: Path
) -> None:
    total = 60
    each = write_lines(
        tmp_path / "calls.jsonl", *[{"ms": 200, "fail": n % 5 == 0} for n in range(total)]
    )
    failures = tmp_path / "failures.jsonl"
    process = start(
        "call", f"{server.base}/nap", "--each", each, "--concurrency", "4",
        "--failures", str(failures), "--timeout", "10",
    )  # fmt: skip
    server.gauge.wait_for(9)  # calls are flowing: the second batch of 4 has started
    process.send_signal(signal.SIGINT)
    out, err = finish(process)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted: no new call starts; waiting up to 10 s for the " in err
    outputs = [json.loads(line) for line in out.splitlines()]
    report = INTERRUPTED.search(err)
    assert report, err
    finished, not_started = int(report["finished"]), int(report["not_started"])
    # honest: what it says finished is what the server saw, and every call it saw is reported
    assert finished == len(outputs) == len(server.gauge.task_ids)
    assert sorted(o["task_id"] for o in outputs) == sorted(server.gauge.task_ids)
    assert report["abandoned"] == "0"
    assert finished + not_started == total
    assert f"(those after line {max(o['line'] for o in outputs)})" in err
    assert 8 < finished < total
    assert [o["line"] for o in outputs] == list(range(1, finished + 1))
    # the failures file holds every failure that finished, and nothing else
    failed = [o for o in outputs if "error" in o]
    assert failed  # every fifth line fails
    assert [r["$task_id"] for r in read_jsonl(failures)] == [o["task_id"] for o in failed]
    assert summary(err)["failed"] == str(len(failed))


@POSIX_SIGNALS
def test_a_second_ctrl_c_abandons_the_calls_in_flight(server: Server, tmp_path: Path) -> None:
    each = write_lines(tmp_path / "calls.jsonl", *[{}] * 10)
    failures = tmp_path / "failures.jsonl"
    process = start(
        "call", f"{server.base}/hold", "--each", each, "--concurrency", "3",
        "--failures", str(failures),
    )  # fmt: skip
    assert process.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = pump(process.stderr, lines)
    try:
        server.gauge.wait_for(3)  # three held at the server, the rest waiting
        process.send_signal(signal.SIGINT)
        line = lines.get(timeout=TIMEOUT)
        assert "waiting up to 10 s for the 3 in flight (Ctrl-C again to stop waiting)" in line
        process.send_signal(signal.SIGINT)
        assert process.wait(TIMEOUT) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)
    reader.join(TIMEOUT)
    assert process.stdout is not None
    assert process.stdout.read() == ""  # none finished
    process.stdout.close()
    process.stderr.close()
    err = "".join(lines.queue)
    report = INTERRUPTED.search(err)
    assert report, err
    shown = report.group("finished", "abandoned", "lines", "not_started")
    assert shown == ("0", "3", "1, 2, 3", "7")
    # an abandoned call may have run: it goes in the failures file, to be sent again
    # with the same task id, which the receiver can tell it has seen
    records = read_jsonl(failures)
    assert [r["$error"]["type"] for r in records] == ["Abandoned"] * 3
    assert sorted(r["$task_id"] for r in records) == sorted(server.gauge.task_ids)


@POSIX_SIGNALS
def test_ctrl_c_while_stdin_stalls_exits_cleanly(server: Server) -> None:
    # the reader thread is blocked reading a pipe that stays open: exiting must not wait
    # for it, nor trip over it (a thread blocked in sys.stdin's buffer aborts the exit)
    env = dict(os.environ, PYTHONUTF8="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatchkit", "call", f"{server.base}/multiply", "--each", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=env,
    )
    assert process.stdin is not None
    try:
        process.stdin.write('{"x": 1, "y": 2}\n\n{"x": 2, "y": 2}\n')
        process.stdin.flush()
        server.gauge.wait_for(2)
        process.send_signal(signal.SIGINT)
        assert process.wait(TIMEOUT) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)
        process.stdin.close()
    assert process.stdout is not None
    assert process.stderr is not None
    with process.stdout, process.stderr:  # it has ended: its pipes are at their end
        out, err = process.stdout.read(), process.stderr.read()
    assert "Fatal Python error" not in err
    assert [json.loads(line)["retval"] for line in out.splitlines()] == [2, 4]
    assert (
        "interrupted: 2 calls finished, 0 abandoned in flight, not started: those after line 3"
        in err
    )
