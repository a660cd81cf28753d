"""The ``dispatchkit`` command: ``call``, ``serve``, ``plugins``, ``demo``, ``attempts``,
``dead-letters`` and ``endpoints``.

Exit codes: 0 success; 1 the call (or the server) failed, the error on stderr;
2 bad usage (an option, a ``key=value``, the method, the URL, an app that
cannot be loaded); 130 interrupted. An expected error never shows a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from dispatchkit import _call_cli, _delivery_cli, _endpoints_cli, _serve_cli
from dispatchkit._cli_output import describe, say
from dispatchkit._dispatcher import Dispatcher
from dispatchkit._version import __version__
from dispatchkit.exceptions import DispatchError, EncodeError, UsageError

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


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
        "Arguments are key=value pairs; a repeated key sends a list. With --each FILE, "
        "one call per line of FILE (a JSON object of arguments), one JSON line per call out.",
    )
    _call_cli.add_arguments(call)
    call.set_defaults(handler=_call_cli.run)

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

    attempts = commands.add_parser(
        "attempts",
        help="show the attempts of a call run by the executor (Celery)",
        description="Show the record of each attempt of the call TASK_ID, as the executor "
        "(DISPATCHKIT_EXECUTOR, e.g. celery) keeps them: number, start (UTC), duration, "
        "outcome, worker and error.",
    )
    _delivery_cli.add_attempts_arguments(attempts)

    dead_letters = commands.add_parser(
        "dead-letters",
        help="list, show, replay or purge the calls whose retry schedule ran out",
        description="The dead letters the executor (DISPATCHKIT_EXECUTOR, e.g. celery) keeps: "
        "calls whose retry schedule ran out on failures worth retrying.",
    )
    _delivery_cli.add_dead_letters_arguments(dead_letters)

    endpoints = commands.add_parser(
        "endpoints",
        help="show and manage the endpoint isolation the Celery workers share",
        description="The circuit breakers, rate limits, calls in flight and disabled URLs "
        "the executor's workers share (DISPATCHKIT_EXECUTOR=celery: in Redis).",
    )
    _endpoints_cli.add_arguments(endpoints)
    endpoints.set_defaults(handler=_endpoints_cli.run)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    # argparse cannot take key=value pairs on both sides of an option
    # (``call URL a=1 -X POST b=2``): the pairs after it come back unrecognized.
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
        say(exc.message)  # nothing was sent: the call's context would be noise
        return EXIT_USAGE
    except DispatchError as exc:
        say(describe(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`dispatchkit demo | head`); say nothing more
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())  # so that flushing at exit is quiet
            finally:
                os.close(devnull)
        return EXIT_FAILED
    return status


def _plugins(args: argparse.Namespace) -> int:
    with Dispatcher() as dispatcher:
        infos = [info for info in dispatcher.plugins if args.all or not info.builtin]
    if not infos:
        say("no plugin is installed (--all lists the built-in ones too)")
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


def _demo(args: argparse.Namespace) -> int:
    from dispatchkit._demo import run

    return run()


if __name__ == "__main__":
    sys.exit(main())
