"""The ``dispatchkit`` command: ``call``, ``plugins`` and ``demo``.

Exit codes: 0 success, 1 the call failed (the error on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import orjson

from dispatchkit._dispatcher import Dispatcher
from dispatchkit._version import __version__
from dispatchkit.exceptions import DispatchError, UsageError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatchkit", description="Call HTTP callback tasks.")
    parser.add_argument("--version", action="version", version=f"dispatchkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    call = commands.add_parser("call", help="call a task and print its retval as JSON")
    call.add_argument("url")
    call.add_argument("arguments", nargs="*", metavar="key=value")
    call.add_argument("-X", "--method", default="GET")
    call.add_argument("--timeout", type=float, default=10.0)

    plugins = commands.add_parser("plugins", help="list installed plugins and their hooks")
    plugins.add_argument("--all", action="store_true", help="include the built-in plugins")

    commands.add_parser("demo", help="run a TaskApp on loopback and call it")
    return parser


def _arguments(pairs: Sequence[str]) -> dict[str, str | list[str]]:
    arguments: dict[str, str | list[str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"argument {pair!r} is not key=value")
        if key in arguments:  # a repeated key becomes a list, as on the wire
            previous = arguments[key]
            arguments[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            arguments[key] = value
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "call":
            with Dispatcher(timeout=args.timeout) as d:
                retval = d.apply(args.url, args.method, _arguments(args.arguments))
            sys.stdout.write(orjson.dumps(retval, option=orjson.OPT_INDENT_2).decode() + "\n")
        elif args.command == "plugins":
            with Dispatcher() as d:
                for info in d.plugins:
                    if info.builtin and not args.all:
                        continue
                    origin = f"{info.distribution or '-'} {info.version or ''}".strip()
                    print(f"{info.name:<12} {origin:<28} {', '.join(info.hooks)}")
        else:
            from dispatchkit._demo import run

            return run()
    except UsageError as exc:
        print(f"dispatchkit: {exc}", file=sys.stderr)
        return 2
    except DispatchError as exc:
        print(f"dispatchkit: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
