"""The ``dispatchkit`` command line, in-process through ``main()`` and as a real process."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from dispatchkit import Dispatcher
from dispatchkit._cli import main
from dispatchkit.server import TaskApp, TaskServer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "cli.md"
TIMEOUT = 60.0  # bound on any one subprocess; none comes near it
SERVING = re.compile(r"Serving (\d+) tasks? on (http://127\.0\.0\.1:(\d+))/")


def make_app() -> TaskApp:
    app = TaskApp()

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    @app.task
    def listing(values: list[str]) -> list[str]:
        return values

    @app.task
    def boom() -> None:
        raise RuntimeError("kaput")

    @app.task
    def echo(data: Any = None, n: Any = None, s: Any = None) -> Any:
        return {"data": data, "n": n, "s": s}

    return app


class Recorder:
    """A WSGI app in front of the TaskApp that keeps the last request's method and headers."""

    def __init__(self, app: TaskApp) -> None:
        self.app = app
        self.method = ""
        self.headers: dict[str, str] = {}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        self.method = str(environ["REQUEST_METHOD"])
        self.headers = {
            key[5:].replace("_", "-").lower(): str(value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        self.headers["content-type"] = str(environ.get("CONTENT_TYPE", ""))
        return self.app(environ, start_response)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder(make_app())


@pytest.fixture
def base(recorder: Recorder) -> Iterator[str]:
    with TaskServer(recorder, port=0) as server:
        yield server.url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def cli_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUTF8="1")
    env.pop("DISPATCHKIT_DISABLE_PLUGIN_AUTOLOAD", None)  # the plugins tests need discovery
    return env


def cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dispatchkit ...`` to the end, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "dispatchkit", *argv],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=TIMEOUT,
        cwd=cwd,
        env=cli_env(),
        check=False,
    )


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- call ---------------------------------------------------------------------------


def test_call_get_prints_the_retval_as_json(
    base: str, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "call", f"{base}/multiply", "x=6", "y=7")
    assert (status, err) == (0, "")
    assert json.loads(out) == 42
    assert recorder.method == "GET"


def test_call_post(base: str, recorder: Recorder, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "call", "-X", "post", f"{base}/multiply", "x=6", "y=7")
    assert status == 0
    assert json.loads(out) == 42
    assert recorder.method == "POST"
    assert recorder.headers["content-type"] == "application/x-www-form-urlencoded"


def test_repeated_keys_become_a_list(base: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "call", f"{base}/listing", "values=a", "values=b", "values=ü")
    assert status == 0
    assert json.loads(out) == ["a", "b", "ü"]


def test_arguments_on_both_sides_of_an_option(
    base: str, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "call", f"{base}/multiply", "x=6", "-X", "POST", "y=7")
    assert (status, json.loads(out), recorder.method) == (0, 42, "POST")


def test_json_body_parses_values_that_are_json(
    base: str, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["call", "--json", f"{base}/echo", 'data={"a": [1, true]}', "n=12", "s=plain text"]
    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert json.loads(out) == {"data": {"a": [1, True]}, "n": 12, "s": "plain text"}
    # --json without -X means POST, as with curl --json
    assert recorder.method == "POST"
    assert recorder.headers["content-type"] == "application/json"


def test_headers_and_task_id_are_sent(
    base: str, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["call", f"{base}/multiply", "x=1", "y=2", "--task-id", "job-42"]
    argv += ["-H", "X-Trace: one", "-H", "x-trace: two", "-H", "user-agent: tester/1"]
    status, _, _ = run(capsys, *argv)
    assert status == 0
    assert recorder.headers["idempotency-key"] == "job-42"
    assert recorder.headers["x-trace"] == "one, two"
    assert recorder.headers["user-agent"] == "tester/1"  # replaces the default, not added


def test_failing_task_exits_1_with_the_reason(
    base: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "call", f"{base}/boom")
    assert (status, out) == (1, "")
    assert "RemoteExecuteError (HTTP 500)" in err
    assert "RuntimeError: kaput" in err


def test_bad_argument_exits_1_with_the_400(base: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "call", f"{base}/multiply", "x=six", "y=1")
    assert status == 1
    assert "(HTTP 400)" in err
    assert "invalid int 'six'" in err


def test_refused_port_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/multiply"
    status, out, err = run(capsys, "call", "--timeout", "2", url, "x=1")
    assert (status, out) == (1, "")
    assert err.startswith("dispatchkit: ConnectError: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["call", "{base}/multiply", "x"], "argument 'x' is not key=value"),
        (["call", "{base}/multiply", "=1"], "argument '=1' is not key=value"),
        (["call", "-X", "BREW", "{base}/multiply"], "unsupported HTTP method 'BREW'"),
        (["call", "127.0.0.1/multiply"], "URL has no scheme"),
        (["call", "ftp://127.0.0.1/multiply"], "no transport for scheme 'ftp'"),
        (["call", "--json", "-X", "GET", "{base}/multiply"], "--json needs a method with a body"),
        (["call", "-H", "no colon", "{base}/multiply"], "is not 'Name: value'"),
        (["call", "-H", "X-A: a\rb", "{base}/multiply"], "control character"),
        (["call", "-H", "Idempotency-Key: 1", "{base}/multiply"], "use --task-id"),
        (["call", "--task-id", "two words", "{base}/multiply"], "--task-id"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, base: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, *[arg.format(base=base) for arg in argv])
    assert (status, out) == (2, "")
    assert err.startswith("dispatchkit: ")
    assert message in err


@pytest.mark.parametrize(
    "argv",
    [
        ["nosuchcommand"],
        [],
        ["call"],
        ["call", "http://127.0.0.1:1/x", "--timeout", "0"],
        ["call", "http://127.0.0.1:1/x", "--timeout", "soon"],
        ["call", "http://127.0.0.1:1/x", "a=1", "--bogus"],
        ["serve", "tasks:app", "--port", "70000"],
    ],
)
def test_argparse_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert "error:" in err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--help")[0] == 0
    status, out, _ = run(capsys, "--version")
    assert status == 0
    assert out.startswith("dispatchkit ")


def test_real_process_exit_codes(base: str) -> None:
    done = cli("call", f"{base}/multiply", "x=3", "y=4")
    assert (done.returncode, json.loads(done.stdout)) == (0, 12)
    done = cli("call", f"{base}/boom")
    assert (done.returncode, done.stdout) == (1, "")
    assert "kaput" in done.stderr
    assert "Traceback" not in done.stderr
    done = cli("nosuchcommand")
    assert (done.returncode, done.stdout) == (2, "")
    assert "invalid choice: 'nosuchcommand'" in done.stderr


def test_console_script_is_installed(base: str) -> None:
    script = Path(sys.executable).with_name("dispatchkit")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    done = subprocess.run(
        [str(script), "call", f"{base}/multiply", "x=2", "y=21"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=cli_env(),
        check=False,
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "42", "")


# -- serve --------------------------------------------------------------------------

TASKS_MODULE = """
from dispatchkit.server import TaskApp

app = TaskApp()
not_an_app = 42


@app.task
def multiply(x: int, y: int) -> int:
    return x * y


@app.task
def shout(text: str) -> str:
    return text.upper()
"""


def read_line(lines: queue.Queue[str | None], deadline: float) -> str | None:
    """The next line of output, or None at end of output; fails past ``deadline``."""
    try:
        return lines.get(timeout=max(deadline - time.monotonic(), 0.01))
    except queue.Empty:
        pytest.fail("no output from `dispatchkit serve` in time")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_a_module_then_stop_it(stop: signal.Signals, tmp_path: Path) -> None:
    (tmp_path / "cli_tasks_mod.py").write_text(TASKS_MODULE, encoding="utf-8")
    stderr_path = tmp_path / "stderr.txt"
    argv = [sys.executable, "-m", "dispatchkit", "serve", "cli_tasks_mod:app", "--port", "0"]
    with (
        stderr_path.open("w", encoding="utf-8") as stderr,
        subprocess.Popen(
            argv,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            encoding="utf-8",
            env=cli_env(),
        ) as process,
    ):
        assert process.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(stream: IO[str]) -> None:
            for line in stream:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=pump, args=(process.stdout,), daemon=True)
        reader.start()
        try:
            line = read_line(lines, time.monotonic() + TIMEOUT)
            assert line is not None, f"serve ended early: {stderr_path.read_text()}"
            match = SERVING.fullmatch(line.rstrip("\n"))
            assert match, line
            assert match.group(1) == "2"
            assert int(match.group(3)) > 0  # the port picked, not 0
            with Dispatcher(timeout=5) as d:
                assert d.call(f"{match.group(2)}/multiply", x=6, y=7) == 42
                assert d.call(f"{match.group(2)}/shout", "POST", text="hi") == "HI"
                # the pooled connection stays open: stopping must not wait on it
                process.send_signal(stop)
                assert process.wait(timeout=TIMEOUT) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=TIMEOUT)
            reader.join(timeout=TIMEOUT)
    assert "Traceback" not in stderr_path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cli_no_such_module:app", "cannot import 'cli_no_such_module'"),
        ("cli_tasks_mod:nope", "module 'cli_tasks_mod' has no attribute 'nope'"),
        ("cli_tasks_mod", "module 'cli_tasks_mod' has no attribute 'app'"),
        ("cli_tasks_mod:not_an_app", "is not a dispatchkit TaskApp (got int)"),
        ("not a module:app", "is not MODULE:APP"),
    ],
)
def test_serve_what_is_not_there_exits_2(spec: str, message: str, tmp_path: Path) -> None:
    # cli_tasks_mod here has no `app` at all
    (tmp_path / "cli_tasks_mod.py").write_text("not_an_app = 42\n", encoding="utf-8")
    done = cli("serve", spec, "--port", "0", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_module_that_fails_to_import_shows_its_traceback(tmp_path: Path) -> None:
    (tmp_path / "cli_broken_mod.py").write_text("raise RuntimeError('broken')\n", "utf-8")
    done = cli("serve", "cli_broken_mod:app", "--port", "0", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert "RuntimeError: broken" in done.stderr
    assert "importing 'cli_broken_mod:app' failed" in done.stderr


def test_serve_on_a_taken_port_exits_1(tmp_path: Path) -> None:
    (tmp_path / "cli_tasks_mod.py").write_text(TASKS_MODULE, encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = cli("serve", "cli_tasks_mod:app", "--port", port, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert f"cannot listen on 127.0.0.1 port {port}" in done.stderr


def test_serve_on_a_host_that_cannot_be_one_exits_1(tmp_path: Path) -> None:
    (tmp_path / "cli_tasks_mod.py").write_text(TASKS_MODULE, encoding="utf-8")
    done = cli("serve", "cli_tasks_mod:app", "--port", "0", "--host", "a" * 300, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert "cannot listen on" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("backlog", ["0", "65536", "9" * 30])
def test_serve_refuses_a_backlog_listen_cannot_take(backlog: str, tmp_path: Path) -> None:
    done = cli("serve", "cli_tasks_mod:app", "--backlog", backlog, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert "must be 1 to 65535" in done.stderr


# -- plugins ------------------------------------------------------------------------


def plugin_names(output: str) -> list[str]:
    rows = output.splitlines()
    assert rows[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "HOOKS"]
    return [row.split()[0] for row in rows[1:]]


def test_plugins_lists_installed_ones_only() -> None:
    done = cli("plugins")
    assert (done.returncode, done.stderr) == (0, "")
    names = plugin_names(done.stdout)
    assert "example" in names
    assert "transport" not in names
    row = next(row for row in done.stdout.splitlines() if row.startswith("example "))
    assert "dispatchkit-example" in row
    assert "dispatchkit_prepare_request" in row


def test_plugins_all_lists_the_builtins() -> None:
    done = cli("plugins", "--all")
    assert done.returncode == 0
    names = plugin_names(done.stdout)
    assert {"transport", "codec", "retry", "executor", "example"} <= set(names)


# -- demo ---------------------------------------------------------------------------


def test_demo_runs_and_tells_the_story() -> None:
    done = cli("demo")
    assert (done.returncode, done.stderr) == (0, "")
    out = done.stdout
    assert "multiply(x=10, y=10) -> 100" in out
    assert "RemoteExecuteError (HTTP 500): ZeroDivisionError" in out
    assert "RemoteExecuteError (HTTP 400): argument 'x'" in out
    assert "get_async(x=10, y=10)" in out
    assert "HttpDispatchTask.delay(" in out
    assert re.search(
        r"\[log\] Task dispatchkit\.HttpDispatchTask\[[0-9a-f]{32}\] processed: 100", out
    )
    assert "-> 100 (state SUCCESS)" in out
    assert "(state FAILURE)" in out
    assert "300/300 calls done, all results correct" in out
    assert "\r" not in out  # not a terminal: no progress bar
    pooling = re.search(
        r"Pooling: (\d+) calls made; the server saw (\d+) requests on (\d+) connections opened: "
        r"[\d.]+ calls per connection",
        out,
    )
    assert pooling, out
    calls, served, opened = map(int, pooling.groups())
    assert calls == served
    assert 1 <= opened < calls / 10  # keep-alive: far fewer connections than calls


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_demo_draws_a_progress_bar_on_a_terminal() -> None:
    from dispatchkit._demo import FAN_OUT, run

    dispatchkit_log = logging.getLogger("dispatchkit")
    server_log = logging.getLogger("dispatchkit.server")
    before = (dispatchkit_log.level, list(dispatchkit_log.handlers), server_log.level)
    out = FakeTerminal()
    assert run(out) == 0
    text = out.getvalue()
    assert f"\r  [{'#' * 30}] {FAN_OUT}/{FAN_OUT}\n" in text
    assert re.search(rf"\r  \[#*\.+\] \d+/{FAN_OUT}", text)  # partway
    # the demo put the logging it touched back as it was
    after = (dispatchkit_log.level, list(dispatchkit_log.handlers), server_log.level)
    assert after == before


# -- docs ---------------------------------------------------------------------------


def test_docs_cover_every_command_and_option() -> None:
    from dispatchkit._cli import _parser

    text = CLI_MD.read_text(encoding="utf-8")
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert f"dispatchkit {name}" in text, f"docs/cli.md does not show `dispatchkit {name}`"
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in text, f"docs/cli.md lacks {name} {option}"


def test_docs_python_blocks_run() -> None:
    fence = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
    blocks = [body for lang, body in fence.findall(CLI_MD.read_text("utf-8")) if lang == "python"]
    for number, block in enumerate(blocks, 1):
        code = compile(textwrap.dedent(block), f"docs/cli.md python block {number}", "exec")
        if not block.startswith("# not run"):
            exec(code, {"__name__": f"cli_md_{number}"})
