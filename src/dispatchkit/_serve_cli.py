"""``dispatchkit serve module:app``: import a TaskApp by name and serve it until stopped."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
import traceback
from types import FrameType
from typing import TYPE_CHECKING

from dispatchkit.exceptions import UsageError

if TYPE_CHECKING:
    from dispatchkit.server import TaskApp

__all__ = ["add_arguments", "load_app", "run"]

_LOG_LEVELS = ("debug", "info", "warning", "error")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0 to 65535): {text!r}")
    return port


def _backlog(text: str) -> int:
    from dispatchkit.server._serve import MAX_BACKLOG  # the server, only when serving

    try:
        backlog = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= backlog <= MAX_BACKLOG:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_BACKLOG}: {text!r}")
    return backlog


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "app",
        metavar="MODULE:APP",
        help="where the TaskApp is, e.g. tasks:app (APP defaults to app)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, default=8000, help="port to bind; 0 picks a free one (default: 8000)"
    )
    parser.add_argument(
        "--backlog",
        type=_backlog,
        default=None,
        help="connections the kernel may queue before they are accepted; "
        "the kernel caps it (default: 1024)",
    )
    parser.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default="warning",
        help="log level on stderr; debug shows every request (default: warning)",
    )


def load_app(spec: str) -> TaskApp:
    """The TaskApp named by ``module:attribute`` (``module`` alone means ``module:app``).

    The current directory comes first on ``sys.path``, as with gunicorn and
    uvicorn. Raises :class:`~dispatchkit.UsageError` when the module or the
    attribute does not exist or is not a TaskApp; an error raised by the
    module's own code while importing propagates as it is.
    """
    from dispatchkit.server import TaskApp

    module_name, sep, attribute = spec.partition(":")
    if not sep:
        attribute = "app"
    if not (_dotted(module_name) and _dotted(attribute)):
        raise UsageError(f"{spec!r} is not MODULE:APP (for example tasks:app)")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # only the module asked for, or a package above it; a missing import
        # inside the module is the module's own error
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise
        raise UsageError(
            f"cannot import {module_name!r}: no module named {exc.name!r} in {cwd} "
            "or the installed packages"
        ) from None
    obj: object = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(obj, TaskApp):
        raise UsageError(
            f"{module_name}:{attribute} is not a dispatchkit TaskApp (got {type(obj).__name__})"
        )
    return obj


def _dotted(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


class _Stop(Exception):
    """Raised in the main thread by SIGINT or SIGTERM."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 0 when stopped, 1 when the address cannot be bound."""
    try:
        app = load_app(args.app)
    except UsageError:
        raise
    except Exception:
        # the app's own code failed: its traceback is the message
        traceback.print_exc()
        print(f"dispatchkit: importing {args.app!r} failed", file=sys.stderr, flush=True)
        return 1
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    backlog = {} if args.backlog is None else {"backlog": args.backlog}
    server = app.server(host=args.host, port=args.port, **backlog)
    try:
        server.start()
    except (OSError, UnicodeError, TypeError) as exc:  # TypeError: a host IDNA cannot encode
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        print(
            f"dispatchkit: cannot listen on {args.host} port {args.port}: {reason}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    # The server runs in its own thread and the main thread only sleeps, so a
    # signal never lands in the middle of the server's bookkeeping.
    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    try:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, _stop)
        count = len(app.tasks)
        print(f"Serving {count} task{'' if count == 1 else 's'} on {server.url}/", flush=True)
        while True:
            time.sleep(3600)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        for sig in _STOP_SIGNALS:  # stop() is bounded; a second Ctrl-C cannot cut it short
            signal.signal(sig, signal.SIG_IGN)
        server.stop()
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(sig, handler)
    return 0
