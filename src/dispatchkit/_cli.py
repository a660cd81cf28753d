"""The ``dispatchkit`` command: ``call``, ``serve``, ``plugins`` and ``demo``.

Exit codes: 0 success; 1 the call (or the server) failed, the error on stderr;
2 bad usage (an option, a ``key=value``, the method, the URL, an app that
cannot be loaded); 130 interrupted. An expected error never shows a traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from dispatchkit import _serve_cli
from dispatchkit._dispatcher import Dispatcher
from dispatchkit._encoding import QUERY_METHODS, normalize_method
from dispatchkit._version import __version__
from dispatchkit.exceptions import DispatchError, EncodeError, RemoteExecuteError, UsageError

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# RFC 9110 token: what a header name may be made of
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# sent as the Idempotency-Key header: visible ASCII, bounded
_TASK_ID = re.compile(r"[!-~]{1,200}")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive and finite: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatchkit",
        description="Call and serve HTTP callback tasks.",
        epilog="Exit status: 0 success, 1 the call failed, 2 bad usage.",
    )
    parser.add_argument("--version", action="version", version=f"dispatchkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    call = commands.add_parser(
        "call",
        help="call a task and print its retval as JSON",
        description="Call the task at URL and print its retval as JSON on stdout. "
        "Arguments are key=value pairs; a repeated key sends a list.",
    )
    call.add_argument("url", metavar="URL")
    call.add_argument("arguments", nargs="*", metavar="key=value")
    call.add_argument(
        "-X",
        "--method",
        help="HTTP method (default: GET, or POST with --json)",
    )
    call.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="seconds to connect and between bytes read (default: 10)",
    )
    call.add_argument(
        "--json",
        action="store_true",
        help="send the arguments as one JSON object; values that parse as JSON are sent parsed",
    )
    call.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="add a request header (repeatable)",
    )
    call.add_argument(
        "--task-id", help="the task id, sent as Idempotency-Key (default: a random uuid4 hex)"
    )
    call.set_defaults(handler=_call)

    serve = commands.add_parser(
        "serve",
        help="serve a TaskApp: dispatchkit serve module:app",
        description="Import MODULE (the current directory first on sys.path), take its "
        "attribute APP, a TaskApp, and serve it with keep-alive until Ctrl-C or SIGTERM.",
    )
    _serve_cli.add_arguments(serve)
    serve.set_defaults(handler=_serve_cli.run)

    plugins = commands.add_parser(
        "plugins",
        help="list installed plugins and their hooks",
        description="List the installed plugins: name, distribution, version and hooks.",
    )
    plugins.add_argument("--all", action="store_true", help="include the built-in plugins")
    plugins.set_defaults(handler=_plugins)

    demo = commands.add_parser(
        "demo",
        help="run a TaskApp on loopback and call it, narrated",
        description="Start a TaskApp on loopback and call it every way dispatchkit can.",
    )
    demo.set_defaults(handler=_demo)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    # argparse cannot put key=value pairs on both sides of an option
    # (``call URL a=1 -X POST b=2``); the pairs after it come back unrecognized.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command == "call" and not any(item.startswith("-") for item in extra):
            args.arguments.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    try:
        args = _parse(_parser(), argv)
    except SystemExit as exc:  # argparse has printed the error, or --help / --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        status: int = args.handler(args)
    except (UsageError, EncodeError) as exc:
        _error(exc.message)  # nothing was sent: the call's context would be noise
        return EXIT_USAGE
    except DispatchError as exc:
        _error(_describe(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    return status


def _error(message: str) -> None:
    print(f"dispatchkit: {message}", file=sys.stderr, flush=True)


def _describe(exc: DispatchError) -> str:
    name = type(exc).__name__
    if isinstance(exc, RemoteExecuteError) and exc.status is not None:
        name += f" (HTTP {exc.status})"
    return f"{name}: {exc}"


# -- call ---------------------------------------------------------------------------


def _call(args: argparse.Namespace) -> int:
    method = normalize_method(args.method or ("POST" if args.json else "GET"))
    if args.json and method in QUERY_METHODS:
        raise UsageError(f"--json needs a method with a body (POST, PUT, PATCH), not {method}")
    arguments = parse_arguments(args.arguments, json_values=args.json)
    headers = parse_headers(args.header)
    task_id = args.task_id
    if task_id is not None and not _TASK_ID.fullmatch(task_id):
        raise UsageError(f"--task-id {task_id!r}: use 1 to 200 visible ASCII characters")
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
    return EXIT_OK


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
                pass
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
        if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value):
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
    data = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str)
    data += b"\n"
    out = sys.stdout
    buffer = getattr(out, "buffer", None)
    out.flush()
    if buffer is not None:  # UTF-8 whatever the locale says
        buffer.write(data)
        buffer.flush()
    else:
        out.write(data.decode())
        out.flush()


# -- plugins ------------------------------------------------------------------------


def _plugins(args: argparse.Namespace) -> int:
    with Dispatcher() as dispatcher:
        infos = [info for info in dispatcher.plugins if args.all or not info.builtin]
    if not infos:
        _error("no plugin is installed (--all lists the built-in ones too)")
        return EXIT_OK
    rows = [("NAME", "DISTRIBUTION", "VERSION", "HOOKS")]
    rows += [
        (info.name, info.distribution or "-", info.version or "-", ", ".join(info.hooks) or "-")
        for info in infos
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[3]]))
    return EXIT_OK


# -- demo ---------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from dispatchkit._demo import run

    return run()


if __name__ == "__main__":
    sys.exit(main())
