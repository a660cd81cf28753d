"""``dispatchkit call URL key=value ...``: one call, its retval printed as JSON.

With ``--each FILE``, one call per line of FILE (a JSON object of arguments),
``--concurrency`` of them in flight, each retval a JSON line on stdout in input
order; docs/cli.md has the line format, the outputs and the exit statuses.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from typing import Any

import orjson

from dispatchkit._call_each import DEFAULT_CONCURRENCY, TASK_ID, run_each, write_stdout
from dispatchkit._cli_output import json_bytes
from dispatchkit._dispatcher import Dispatcher
from dispatchkit._encoding import QUERY_METHODS, normalize_method
from dispatchkit.exceptions import UsageError

__all__ = ["add_arguments", "parse_arguments", "parse_headers", "run"]

# RFC 9110 token: what a header name is made of
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# control characters, horizontal tab excepted
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


#: The most calls in flight ``--concurrency`` allows.
MAX_CONCURRENCY = 1024


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive and finite: {text!r}")
    return value


def _concurrency(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_CONCURRENCY}: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL")
    parser.add_argument("arguments", nargs="*", metavar="key=value")
    parser.add_argument("-X", "--method", help="HTTP method (default: GET, or POST with --json)")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="seconds to connect and between bytes read (default: 10)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="send the arguments as one JSON object; values that parse as JSON are sent parsed",
    )
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="add a request header (repeatable)",
    )
    parser.add_argument(
        "--task-id", help="the task id, sent as Idempotency-Key (default: a random uuid4 hex)"
    )
    batch = parser.add_argument_group("batch mode")
    batch.add_argument(
        "--each",
        metavar="FILE",
        help="one call per line of FILE ('-': stdin), each line a JSON object of arguments "
        "that override the key=value ones; one JSON line per call on stdout, in input order",
    )
    batch.add_argument(
        "--concurrency",
        type=_concurrency,
        metavar="N",
        help=f"with --each: calls in flight at most (default: {DEFAULT_CONCURRENCY})",
    )
    batch.add_argument(
        "--failures",
        metavar="FILE",
        help="with --each: write the failed lines to FILE, as lines --each takes back",
    )


def run(args: argparse.Namespace) -> int:
    """Make the call and print the retval; errors propagate as DispatchError.

    With ``--each``, make one call per line and return the exit status (0, 1 or 130).
    """
    method = normalize_method(args.method or ("POST" if args.json else "GET"))
    if args.json and method in QUERY_METHODS:
        raise UsageError(f"--json needs a method with a body (POST, PUT, PATCH), not {method}")
    arguments = parse_arguments(args.arguments, json_values=args.json)
    headers = parse_headers(args.header)
    task_id = args.task_id
    if task_id is not None and not TASK_ID.fullmatch(task_id):
        raise UsageError(f"--task-id {task_id!r}: use 1 to 200 visible ASCII characters")
    if args.each is not None:
        if task_id is not None:
            raise UsageError('--task-id names one call: with --each a line has its own "$task_id"')
        return run_each(args, method, arguments, headers)
    for option, value in (("--concurrency", args.concurrency), ("--failures", args.failures)):
        if value is not None:
            raise UsageError(f"{option} needs --each")
    with Dispatcher(timeout=args.timeout) as dispatcher:
        retval = dispatcher.apply(
            args.url,
            method,
            arguments,
            headers=headers or None,
            task_id=task_id,
            json=args.json,
        )
    _write_json(retval)
    return 0


def parse_arguments(pairs: Sequence[str], *, json_values: bool = False) -> dict[str, Any]:
    """``["x=1", "y=2", "y=3"]`` → ``{"x": "1", "y": ["2", "3"]}``: a repeated key is a list.

    With ``json_values`` a value that parses as JSON is taken parsed (``x=1`` is
    the number 1, ``tags=["a"]`` a list); any other value stays a string.
    """
    arguments: dict[str, Any] = {}
    repeated: set[str] = set()
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"argument {pair!r} is not key=value")
        value: Any = text
        if json_values:
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError:
                value = text
        if key in repeated:
            arguments[key].append(value)
        elif key in arguments:
            arguments[key] = [arguments[key], value]
            repeated.add(key)
        else:
            arguments[key] = value
    return arguments


def parse_headers(lines: Sequence[str]) -> dict[str, str]:
    """``["Name: value", ...]`` → a dict; a repeated name joins its values with ``", "``."""
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not _TOKEN.fullmatch(name):
            raise UsageError(f"header {line!r} is not 'Name: value'")
        if _CONTROL.search(value):
            raise UsageError(f"header {name!r}: the value holds a control character")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise UsageError(f"header {name!r}: the value is not Latin-1 text") from None
        # one spelling per name, so that "user-agent: x" replaces the default User-Agent
        name = "-".join(part.capitalize() for part in name.split("-"))
        if name == "Idempotency-Key":
            raise UsageError("the Idempotency-Key header is the task id: use --task-id")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _write_json(value: Any) -> None:
    write_stdout(json_bytes(value, indent=True) + b"\n")
