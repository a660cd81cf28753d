"""Answers nested deeper than Python's recursion limit or orjson's writer: the call,
the ``call`` command and ``call --each`` all end cleanly.

orjson reads JSON nested up to 1,024 levels and writes at most 254; ``str()``
of a list nested a thousand deep exceeds Python's recursion limit. Every
server here is a real socket on 127.0.0.1 (``support.scripted_server``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatchkit import AsyncDispatcher, DispatchError, RemoteExecuteError, UnknownStatusError
from dispatchkit._cli import main
from dispatchkit._cli_output import json_bytes
from support.scripted_server import RawRequest, ScriptedServer, response, serve


def nested(depth: int) -> str:
    """A JSON list ``depth`` levels deep around 1."""
    return "[" * depth + "1" + "]" * depth


def answer(request: RawRequest) -> bytes:
    depth = int(request.target.rsplit("/", 1)[1].partition("?")[0])
    if request.target.startswith("/fail/"):
        body = f'{{"status": "failure", "reason": {nested(depth)}}}'
    elif request.target.startswith("/status/"):
        body = f'{{"status": {nested(depth)}}}'
    else:
        body = f'{{"status": "success", "retval": {nested(depth)}}}'
    return response(200, body.encode())


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer([serve(answer)]) as running:
        yield running


def test_a_failure_reason_a_thousand_deep_is_a_remote_execute_error(
    server: ScriptedServer, make_dispatcher: Any
) -> None:
    d = make_dispatcher(retry_attempts=1)
    with pytest.raises(RemoteExecuteError) as info:
        d.call(f"{server.url}/fail/1000")
    assert info.value.reason.startswith("[[[")
    with pytest.raises(UnknownStatusError, match=r"unknown envelope status \[\[\["):
        d.call(f"{server.url}/status/1000")
    assert d.call(f"{server.url}/ok/3") == [[[1]]]  # the connection serves on


def test_the_same_on_the_async_dispatcher(server: ScriptedServer) -> None:
    async def main_() -> None:
        async with AsyncDispatcher(retry_attempts=1) as d:
            with pytest.raises(RemoteExecuteError):
                await d.call(f"{server.url}/fail/1000")
            with pytest.raises(UnknownStatusError):
                await d.call(f"{server.url}/status/1000")

    asyncio.run(main_())


def test_the_call_command_writes_a_retval_deeper_than_orjson_writes(
    server: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["call", f"{server.url}/ok/300"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == json.loads(nested(300))
    assert err == ""


def test_the_call_command_writes_1000_deep_or_says_it_cannot(
    server: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # The standard library's encoder writes 1,000 levels from Python 3.12 on (its C
    # recursion check); before, it raises RecursionError and the command says so.
    status = main(["call", f"{server.url}/ok/1000"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if status == 0:
        assert json.loads(out) == json.loads(nested(1000))
    else:
        assert (status, out) == (1, "")
        assert "cannot write the value as JSON" in err


def test_what_no_encoder_can_write_is_a_dispatch_error() -> None:
    looped: list[Any] = []
    looped.append(looped)  # what a codec plugin could hand back
    with pytest.raises(DispatchError, match="cannot write the value as JSON"):
        json_bytes(looped)
    assert json_bytes(json.loads(nested(300))) == nested(300).encode()


def test_each_writes_deep_retvals_and_records_what_it_cannot_write(
    server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = tmp_path / "calls.jsonl"
    deep_argument = {"x": json.loads(nested(300))}  # refused: a list of lists is no form value
    lines.write_text(
        "\n".join(json.dumps(x) for x in ({}, {"depth": 1}, deep_argument)) + "\n",
        encoding="utf-8",
    )
    failures = tmp_path / "failures.jsonl"
    for depth, line in ((300, 1), (1000, 2)):
        url = f"{server.url}/ok/{depth}"
        status = main(
            ["call", url, "--each", str(lines), "--failures", str(failures), "--concurrency", "1"]
        )
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        records = {r["line"]: r for r in map(json.loads, out.splitlines())}
        assert sorted(records) == [1, 2, 3]  # every line has its record
        assert records[3]["error"]["type"] == "EncodeError"
        failed = [json.loads(x) for x in failures.read_text(encoding="utf-8").splitlines()]
        assert status == 1  # line 3 failed
        if "retval" in records[line]:  # written (always at 300; at 1,000 from Python 3.12)
            assert records[line]["retval"] == json.loads(nested(depth))
            assert [f["$line"] for f in failed] == [3]
        else:
            assert depth == 1000
            assert records[line]["error"]["message"].startswith("cannot write the value as JSON")
            assert sorted(f["$line"] for f in failed) == [1, 2, 3]
