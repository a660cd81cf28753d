"""``dispatchkit attempts`` and ``dispatchkit dead-letters``: what an executor keeps of its calls.

The core knows no executor's storage. These commands build a Dispatcher from
the environment (``DISPATCHKIT_EXECUTOR`` and the executor's own variables,
such as ``DISPATCHKIT_CELERY_BROKER``) and use what its executor offers, if
it offers it:

* ``attempts(task_id)``: the records of the call's attempts (``Attempt``), oldest first;
* ``dead_letters``: an object with ``list(origin, since, limit)``, ``get(task_id)``,
  ``replay(ids, new_id)`` and ``purge(ids)`` / ``purge_all(origin)``, whose dead
  letters have a ``task_id`` and a ``to_dict()`` that is safe to show.

The Celery executor (``dispatchkit-celery``) has both; an executor without them
is bad usage (exit 2). docs/cli.md has the output formats.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol, TypeVar

from dispatchkit._cli_output import say
from dispatchkit._dispatcher import Dispatcher
from dispatchkit._models import Attempt, Result
from dispatchkit.exceptions import UsageError

__all__ = ["add_attempts_arguments", "add_dead_letters_arguments", "parse_when"]

EXIT_OK = 0
EXIT_FAILED = 1
#: How much of an error the tables show.
ERROR_EXCERPT = 80
#: Relative times for ``--since``: ``90s``, ``30m``, ``2h``, ``7d``, ``1w``.
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: The call's context at the end of an error's message: the same on every row of a table.
_CONTEXT = re.compile(r" \[[A-Z]+ \S+( task \S+)?\]$")

#: What the executor must keep, by the name of what it offers.
_KEPT = {"attempts": "attempts by task id", "dead_letters": "dead letters"}

T = TypeVar("T")


class DeadLetter(Protocol):
    @property
    def task_id(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class DeadLetters(Protocol):
    def list(
        self, origin: str | None = None, since: float | None = None, limit: int | None = 100
    ) -> Sequence[DeadLetter]: ...

    def get(self, task_id: str) -> DeadLetter | None: ...

    def replay(self, ids: Iterable[str], new_id: bool = False) -> Sequence[Result | None]: ...

    def purge(self, ids: Iterable[str]) -> Sequence[str]: ...

    def purge_all(self, origin: str | None = None) -> Sequence[str]: ...


def parse_when(text: str, now: float | None = None) -> float:
    """Unix seconds of ``WHEN``: ISO 8601 (no offset: UTC) or a time ago (``2h``, ``30m``)."""
    value = text.strip()
    relative = _RELATIVE.fullmatch(value.lower())
    if relative:
        ago = float(relative.group(1)) * _UNITS[relative.group(2)]
        return (time.time() if now is None else now) - ago
    if value.endswith(("Z", "z")):  # datetime.fromisoformat reads "Z" from Python 3.11 on
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time or a time ago such as 2h, 30m, 7d: {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


# -- the arguments ----------------------------------------------------------------------


def add_attempts_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task_id", metavar="TASK_ID")
    parser.add_argument("--json", action="store_true", help="print the records as a JSON array")
    parser.set_defaults(handler=run_attempts)


def add_dead_letters_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list",
        help="list the dead letters, newest first",
        description="List the dead letters, newest first.",
    )
    listing.add_argument("--origin", metavar="URL", help="only those of this URL's origin")
    listing.add_argument(
        "--since",
        type=parse_when,
        metavar="WHEN",
        help="only those that died then or later: ISO 8601 (UTC unless it says) or a time "
        "ago: 90s, 30m, 2h, 7d, 1w",
    )
    listing.add_argument(
        "--limit", type=_limit, default=100, metavar="N", help="at most N (default: 100; 0: all)"
    )
    listing.add_argument("--json", action="store_true", help="print them as a JSON array")
    listing.set_defaults(handler=_list)

    show = actions.add_parser(
        "show",
        help="show one dead letter: its call, last error and attempts",
        description="Show one dead letter: its call (URL masked), last error and attempts.",
    )
    show.add_argument("task_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print it as a JSON object")
    show.set_defaults(handler=_show)

    replay = actions.add_parser(
        "replay",
        help="send dead letters again, on a fresh schedule",
        description="Send dead letters again, on a fresh schedule, with the same task id "
        "(Idempotency-Key) unless --new-id. An ID that is not a dead letter (replayed "
        "already, purged) is reported and nothing is sent for it.",
    )
    _ids_or_all(replay)
    replay.add_argument("--new-id", action="store_true", help="send each under a new task id")
    replay.set_defaults(handler=_replay)

    purge = actions.add_parser(
        "purge",
        help="delete dead letters and their attempts",
        description="Delete dead letters and the records of their attempts.",
    )
    _ids_or_all(purge)
    purge.set_defaults(handler=_purge)


def _ids_or_all(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", metavar="ID")
    parser.add_argument("--all", action="store_true", help="every dead letter (of --origin)")
    parser.add_argument("--origin", metavar="URL", help="with --all: only those of this origin")


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


# -- the commands -----------------------------------------------------------------------


def run_attempts(args: argparse.Namespace) -> int:
    def read(attempts: Callable[[str], Sequence[Attempt]]) -> Sequence[Attempt]:
        return attempts(args.task_id)

    records = _with_executor("attempts", read)
    if not records:
        say(f"no attempt recorded for task {args.task_id} (not run yet, expired, or unknown)")
        return EXIT_FAILED
    if args.json:
        _print_json([record.to_dict() for record in records])
    else:
        _print_attempts(records)
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    letters = _with_dead_letters(
        lambda dead: dead.list(origin=args.origin, since=args.since, limit=args.limit or None)
    )
    if args.json:
        _print_json([letter.to_dict() for letter in letters])
        return EXIT_OK
    if not letters:
        say("no dead letter" + (" matches" if args.origin or args.since else ""))
        return EXIT_OK
    rows = [("TASK ID", "DIED (UTC)", "ATTEMPTS", "METHOD", "URL", "LAST ERROR")]
    for letter in letters:
        data = letter.to_dict()
        rows.append(
            (
                data["task_id"],
                _utc(data["died"]),
                str(len(data["attempts"])),
                data["method"],
                data["url"],
                _excerpt(f"{data['error']['type']}: {_CONTEXT.sub('', data['error']['message'])}"),
            )
        )
    _print_table(rows)
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    letter = _with_dead_letters(lambda dead: dead.get(args.task_id))
    if letter is None:
        say(f"{args.task_id} is not a dead letter (replayed, purged, expired, or unknown)")
        return EXIT_FAILED
    data = letter.to_dict()
    if args.json:
        _print_json(data)
        return EXIT_OK
    error = data["error"]
    headers = ", ".join(f"{name}: {value}" for name, value in data["headers"].items()) or "-"
    if data["dropped_headers"]:
        headers += f" (not kept: {', '.join(data['dropped_headers'])})"
    fields = [
        ("task id", data["task_id"]),
        ("died", _utc(data["died"]) + " UTC"),
        ("call", f"{data['method']} {data['url']}" + (" (JSON body)" if data["json"] else "")),
        ("arguments", json.dumps(data["arguments"], ensure_ascii=False, default=str)),
        ("headers", headers),
        ("queue", data["queue"] or "-"),
        ("last error", f"{error['type']}: {error['message']}"),
    ]
    for name, value in fields:
        print(f"{name + ':':<12}{value}")
    print("attempts:")
    _print_attempts([Attempt.from_dict(record) for record in data["attempts"]], indent="  ")
    return EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    ids = _chosen(args)

    def replay(dead: DeadLetters) -> tuple[list[str], Sequence[Result | None]]:
        chosen = ids
        if chosen is None:  # --all: oldest first
            chosen = [letter.task_id for letter in dead.list(origin=args.origin, limit=None)]
            chosen.reverse()
        return chosen, dead.replay(chosen, new_id=args.new_id)

    chosen, results = _with_dead_letters(replay)
    missing = 0
    for task_id, result in zip(chosen, results, strict=True):
        if result is None:
            missing += 1
            say(f"{task_id} is not a dead letter (replayed already, purged, or unknown): "
                   "nothing sent")  # fmt: skip
        elif result.id != task_id:
            print(f"replayed {task_id} as {result.id}")
        else:
            print(f"replayed {task_id}")
    if ids is None and not chosen:
        say("no dead letter to replay")
    return EXIT_FAILED if missing else EXIT_OK


def _purge(args: argparse.Namespace) -> int:
    ids = _chosen(args)

    def purge(dead: DeadLetters) -> Sequence[str]:
        return dead.purge_all(origin=args.origin) if ids is None else dead.purge(ids)

    purged = _with_dead_letters(purge)
    gone = set(purged)
    missing = [] if ids is None else [task_id for task_id in ids if task_id not in gone]
    for task_id in missing:
        say(f"{task_id} is not a dead letter (replayed, purged, or unknown)")
    print(f"purged {len(purged)} dead letter{'' if len(purged) == 1 else 's'}")
    return EXIT_FAILED if missing else EXIT_OK


def _chosen(args: argparse.Namespace) -> list[str] | None:
    """The IDs given, or ``None`` for ``--all``; both or neither is bad usage."""
    if args.all == bool(args.ids):
        raise UsageError(f"dead-letters {args.action}: give IDs or --all (not both)")
    if args.origin is not None and not args.all:
        raise UsageError(f"dead-letters {args.action}: --origin goes with --all")
    return None if args.all else list(dict.fromkeys(args.ids))


# -- the executor -----------------------------------------------------------------------


def _with_executor(name: str, use: Callable[[Any], T]) -> T:
    """``use(what)``: what the executor of a Dispatcher built from the environment offers."""
    with Dispatcher() as dispatcher:
        offered = getattr(dispatcher._get_executor(), name, None)
        if offered is None:
            raise UsageError(
                f"the executor {dispatcher.settings.executor!r} keeps no "
                f"{_KEPT[name]}: set DISPATCHKIT_EXECUTOR to one that "
                "does, such as 'celery' (dispatchkit-celery), and its settings in the "
                "environment (DISPATCHKIT_CELERY_BROKER, ...)"
            )
        return use(offered)


def _with_dead_letters(use: Callable[[DeadLetters], T]) -> T:
    return _with_executor("dead_letters", use)


# -- output -----------------------------------------------------------------------------


def _print_attempts(records: Sequence[Attempt], indent: str = "") -> None:
    rows = [("#", "STARTED (UTC)", "DURATION", "OUTCOME", "WORKER", "ERROR")]
    for record in records:
        rows.append(
            (
                str(record.number),
                f"{record.started_at:%Y-%m-%d %H:%M:%S.%f}"[:-3],
                f"{record.duration:.3f}s",
                record.outcome,
                record.worker,
                _excerpt(_CONTEXT.sub("", record.error)) if record.error else "-",
            )
        )
    _print_table(rows, indent)


def _print_table(rows: Sequence[Sequence[str]], indent: str = "") -> None:
    """Columns padded to their widest cell; the last one as it is."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print(indent + "  ".join([*cells, row[-1]]))


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _utc(iso: str) -> str:
    """An ISO 8601 time of ``to_dict()`` as the tables show it, to the millisecond."""
    moment = datetime.fromisoformat(iso).astimezone(timezone.utc)
    return f"{moment:%Y-%m-%d %H:%M:%S.%f}"[:-3]


def _excerpt(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= ERROR_EXCERPT else line[: ERROR_EXCERPT - 3] + "..."
