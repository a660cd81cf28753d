"""The benchmark figures the docs quote, written from one results file of one run.

README.md and docs/benchmarks.md quote the suite's results between markers::

    <!-- headline:begin ... -->
    ...generated text...
    <!-- headline:end -->

This module rewrites every such block from ``docs/benchmark-results.json``, the
``benchmarks.json`` of one run of ``python -m benchmarks`` (full mode), so that
the headline, the results block and the tables around it always come from the
same run. tests/test_headline.py fails when a block differs from what it would
write.

    python -m benchmarks.headline                          # rewrite the blocks
    python -m benchmarks.headline --from results/benchmarks.json   # adopt a new run first
    python -m benchmarks.headline --check                  # exit 1 when a block is stale
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import checks, report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmark-results.json"
COMMAND = "python -m benchmarks.headline"
#: Each document, and the blocks it holds, in order.
DOCUMENTS = {
    "README.md": ("headline",),
    "docs/benchmarks.md": ("headline", "results", "findings", "standing"),
    "docs/async.md": ("asyncio",),
}
BLOCK = re.compile(
    r"^(?P<begin><!-- (?P<name>[a-z]+):begin[^\n]*-->\n)"
    r"(?P<body>.*?)"
    r"^(?P<end><!-- (?P=name):end -->)$",
    re.DOTALL | re.MULTILINE,
)
WIDTH = 78
TIMES, DASH = "\N{MULTIPLICATION SIGN}", "\N{EN DASH}"
#: What a line is never broken inside: a `code span`, a [link](target).
UNBROKEN = re.compile(r"`[^`]*`|\[[^\]]*\]\([^)]*\)")
#: The clients that keep one connection for the whole run, and those that open one per call.
POOLED = ("urllib3", "dk", "dk_hooks", "httpx", "requests")
UNPOOLED = ("urlopen", "urllib3_new", "dk_new", "httpx_get", "requests_get")
#: Why a target stands where it does, by the target's name (benchmarks/checks.py).
_BELOW_POOLMANAGER = (
    "the transport sends on urllib3's pooled connections below `PoolManager` and reads answer "
    "heads without the `email` parser"
)
WHY = {
    "HTTP: stretch, Dispatcher.call <= 1.00 x urllib3": _BELOW_POOLMANAGER,
    "HTTPS: stretch, Dispatcher.call <= 1.00 x urllib3": _BELOW_POOLMANAGER,
    "HTTPS: >= 1.6 x faster than httpx.Client": "the closest margin: over HTTPS both clients wait "
    "for the same single-threaded TLS server, which narrows the ratio in wall time",
    "HTTPS, 10 ms RTT: pooled >= 2.5 x faster than keep_alive=False": "a pooled call costs one "
    "round trip, a new HTTPS connection about 3.5 (TCP and TLS handshakes)",
    "16 threads: connections map opened <= pool size (no discarding churn)": "the pool blocks "
    "(`block=True`), so no connection is ever discarded",
}


class Stale(Exception):
    """A document lacks a block, or holds one this module does not write."""


@dataclass(frozen=True)
class Run:
    """One run's results, and the figures the docs quote from them."""

    results: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = self.results["meta"]
        return meta

    def matrix(self, rtt: str | None = None) -> dict[str, Any] | None:
        if rtt is None:
            loop: dict[str, Any] | None = self.results.get("loopback")
            return loop
        runs: dict[str, Any] = (self.results.get("rtt") or {}).get("runs") or {}
        return runs.get(rtt)

    def median(self, scheme: str, key: str, rtt: str | None = None) -> float | None:
        return checks.median(self.matrix(rtt), scheme, key)

    def cpu(self, scheme: str, key: str) -> float | None:
        try:
            value = self.results["loopback"]["sequential"][scheme][key]["cpu_median"]
        except (KeyError, TypeError):
            return None
        return float(value) if value else None

    def ratio(self, a: str, b: str, scheme: str, rtt: str | None = None) -> float | None:
        """``a``'s median over ``b``'s, same scheme, same part of the run."""
        return checks.ratio(self.median(scheme, a, rtt), self.median(scheme, b, rtt))

    def sequential(self, scheme: str) -> dict[str, Any]:
        loop = self.matrix() or {}
        found: dict[str, Any] = loop.get("sequential", {}).get(scheme, {})
        return found

    def concurrency(self, threads: int) -> dict[str, Any]:
        loop = self.matrix() or {}
        found: dict[str, Any] = loop.get("concurrency", {}).get("http", {}).get(str(threads), {})
        return found

    def levels(self, section: str) -> dict[int, dict[str, Any]]:
        """Loopback HTTP rows by calls in flight: ``section`` "concurrency" (fast) or "delayed"."""
        loop = self.matrix() or {}
        by_level = (loop.get(section) or {}).get("http") or {}
        return {int(level): rows for level, rows in by_level.items()}

    def async_ratios(self, section: str, base: str, field: str = "median") -> dict[int, float]:
        """The AsyncDispatcher's ``field`` over ``base``'s, by level, where both were measured."""
        found = {}
        for level, rows in self.levels(section).items():
            value = checks.ours_over(rows, base, field) if base in rows else None
            if value and level in checks.ASYNC_LEVELS:
                found[level] = value
        return found

    @property
    def delay(self) -> Any:
        return (self.matrix() or {}).get("delay_ms", "?")

    @property
    def checks(self) -> list[checks.Check]:
        return checks.evaluate(self.results)

    @property
    def date(self) -> str:
        return str(self.meta.get("started", "?"))[:10]

    @property
    def commit(self) -> str:
        commit = self.meta.get("commit")
        return f"commit `{commit}`" if commit else "an unrecorded commit"

    @property
    def command(self) -> str:
        argv = list(self.meta.get("argv") or [])
        if "--out" in argv:  # where the files went says nothing about the run
            at = argv.index("--out")
            del argv[at : at + 2]
        return " ".join(["python -m benchmarks", *argv])


# -- formatting --------------------------------------------------------------------------


def x(value: float | None, digits: int = 1) -> str:
    """A ratio as the docs print it: ``0.81``, ``3.4``; ``?`` when not measured."""
    return "?" if value is None else f"{value:.{digits}f}"


def span(a: float | None, b: float | None, digits: int = 1) -> str:
    """Two ratios (HTTP, HTTPS) as one range, low to high (``3.3-3.4`` with an en dash)."""
    low, high = sorted((x(a, digits), x(b, digits)))
    return low if low == high else f"{low}{DASH}{high}"


def wrap(text: str) -> str:
    """Fill a paragraph to :data:`WIDTH`, never breaking inside a `code span`."""
    glued = UNBROKEN.sub(lambda m: m.group(0).replace(" ", "\0"), text)
    lines = textwrap.wrap(glued, WIDTH, break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines).replace("\0", " ")


def bullet(text: str) -> str:
    """A list item, filled like :func:`wrap` under its ``- ``."""
    glued = UNBROKEN.sub(lambda m: m.group(0).replace(" ", "\0"), text)
    lines = textwrap.wrap(
        glued,
        WIDTH,
        initial_indent="- ",
        subsequent_indent="  ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\n".join(lines).replace("\0", " ")


def spread(values: Sequence[float], digits: int = 2) -> str:
    """Ratios as their range, low to high (``0.91-1.04`` with an en dash)."""
    return span(min(values), max(values), digits) if values else "?"


def levels_text(levels: Sequence[int]) -> str:
    """``4 to 1,024`` (or ``16``): the calls in flight a figure spans."""
    if not levels:
        return "?"
    low, high = min(levels), max(levels)
    return f"{low:,}" if low == high else f"{low:,} to {high:,}"


def files(paths: Sequence[str]) -> str:
    """``a/b.py``, ``a/c/`` (3 files): paths, grouped by folder when a folder holds several."""
    folders: dict[str, list[str]] = {}
    for path in paths:
        folder, _, _ = path.rpartition("/")
        folders.setdefault(folder, []).append(path)
    shown = [
        f"`{group[0]}`" if len(group) == 1 else f"`{folder}/` ({len(group)} files)"
        for folder, group in sorted(folders.items())
    ]
    return ", ".join(shown)


# -- the blocks --------------------------------------------------------------------------


def headline(run: Run, document: str) -> str:
    lead, link = (
        ("Speed", "docs/benchmarks.md")
        if document == "README.md"
        else ("Headline", "#results-on-this-machine")
    )
    http_p, https_p = run.ratio("dk", "urllib3", "http"), run.ratio("dk", "urllib3", "https")
    requests = span(run.ratio("requests", "dk", "http"), run.ratio("requests", "dk", "https"))
    httpx = span(run.ratio("httpx", "dk", "http"), run.ratio("httpx", "dk", "https"))
    text = (
        f"**{lead}** (a {run.meta.get('mode', '?')} run of `python -m benchmarks`, {run.date}, "
        f"{run.commit}; loopback, same server and run, medians; see [the results]({link})): "
        f"`Dispatcher.call` costs {x(http_p, 2)} {TIMES} a bare "
        f"`urllib3.PoolManager.request` + `orjson.loads` over HTTP ({x(https_p, 2)} {TIMES} "
        f"over HTTPS), is {requests} {TIMES} faster than `requests.Session` and {httpx} {TIMES} "
        "faster than `httpx.Client`"
    )
    pooled = run.ratio("dk_new", "dk", "https", rtt="10")
    if pooled is not None:
        text += (
            f"; over HTTPS at 10 ms RTT, pooling makes calls {x(pooled)} {TIMES} faster than a "
            "connection per call"
        )
    urlopen = run.ratio("urlopen", "dk", "https")
    text += (
        f", and over HTTPS on loopback {x(urlopen)} {TIMES} faster than the `urlopen`-per-call "
        "of Celery's old HTTP tasks."
    )
    ratios = run.async_ratios("concurrency", "aiohttp")
    delayed = run.async_ratios("delayed", "aiohttp")
    if ratios or delayed:
        every = list(ratios.values()) + list(delayed.values())
        text += (
            f" From asyncio, `AsyncDispatcher.map` does {spread(every)} {TIMES} the calls/s of "
            f"hand-written aiohttp + orjson with {levels_text([*ratios, *delayed])} calls in "
            "flight."
        )
    return wrap(text) + "\n"


def results_block(run: Run, document: str) -> str:
    meta, found = run.meta, run.checks
    machine, versions = meta.get("machine", {}), meta.get("versions", {})
    failed = [c for c in found if c.status == "FAIL"]
    skipped = [c for c in found if c.status == "SKIP"]
    uncommitted = meta.get("uncommitted") or []
    commit = run.commit
    if uncommitted:
        commit += f" plus uncommitted changes to {files(uncommitted)}"
    load = ", ".join(f"{v:.1f}" for v in machine.get("loadavg_at_start", []))
    intro = (
        f"A {meta.get('mode', '?')} run (`{run.command}`), {run.date}, {commit}, on "
        f"{machine.get('cpu_count', '?')} vCPUs ({machine.get('cpu_model', '?')}, kernel "
        f"{machine.get('kernel', '?')}), load average {load or '?'} at the start, Python "
        f"{versions.get('python')}, urllib3 {versions.get('urllib3')}, requests "
        f"{versions.get('requests')}, httpx {versions.get('httpx')}, orjson "
        f"{versions.get('orjson')}, on a machine shared with other work. "
        + (
            ("Every target it measured passed." if skipped else "Every target passed.")
            if not failed
            else f"{len(failed)} target(s) failed: {', '.join(c.name for c in failed)}."
        )
        + (f" {len(skipped)} target(s) were not measured in it (SKIP below)." if skipped else "")
        + " Its `benchmarks.json` is `docs/benchmark-results.json`, and the plots on this page "
        "are its `benchmarks.png`. In the first table, `Nx` is the client's time divided by "
        "dispatchkit's in the same column. `c` counts the connections the server saw opened, "
        'and `d` counts urllib3\'s "pool is full, discarding connection" warnings.'
    )
    return f"{wrap(intro)}\n\n```text\n{report.text(run.results, found)}\n```\n"


def findings(run: Run, document: str) -> str:
    items = []
    http_p, https_p = run.ratio("dk", "urllib3", "http"), run.ratio("dk", "urllib3", "https")
    cpu = [checks.ratio(run.cpu(s, "dk"), run.cpu(s, "urllib3")) for s in ("http", "https")]
    lead = (
        "**The pipeline costs less than nothing over urllib3.**"
        if http_p is not None and https_p is not None and max(http_p, https_p) <= 1.0
        else "**What the pipeline costs over urllib3.**"
    )
    items.append(
        f"{lead} `Dispatcher.call` (encoding, task id, retry policy, codec, envelope) is "
        f"{x(http_p, 2)} {TIMES} `PoolManager.request` + `orjson.loads` over HTTP and "
        f"{x(https_p, 2)} {TIMES} over HTTPS in wall time, {x(cpu[0], 2)} {TIMES} and "
        f"{x(cpu[1], 2)} {TIMES} in CPU time. It sends on urllib3's pooled connections "
        "directly, skipping PoolManager's per-request URL "
        "parsing and pool lookup and `urlopen`'s per-call bookkeeping, and reads each answer's "
        "head without the `email` parser that http.client uses."
    )
    conns = [
        (key, row)
        for scheme in ("http", "https")
        for key, row in run.sequential(scheme).items()
        if row.get("total_calls")
    ]
    pooled = max((row["connections"] for key, row in conns if key in POOLED), default=None)
    per_call = [row["connections"] / row["total_calls"] for key, row in conns if key in UNPOOLED]
    if pooled is not None and per_call:
        items.append(
            f"**Pooling.** Every pooled client opened at most {pooled} connection"
            f"{'' if pooled == 1 else 's'} for the whole run, and every unpooled client "
            + (
                "one per call"
                if min(per_call) == max(per_call) == 1
                else f"{min(per_call):.2f} to {max(per_call):.2f} per call"
            )
            + " (the `conns/call` column, counted by the server)."
        )
    new_http, new_https = run.ratio("dk_new", "dk", "http"), run.ratio("dk_new", "dk", "https")
    text = (
        f"**Pooling needs latency to matter.** On loopback a new HTTP connection costs only "
        f"{x(new_http)} {TIMES} a pooled call. With TLS it costs {x(new_https)} {TIMES}."
    )
    if run.matrix("10") is not None:
        text += (
            f" Across 10 ms of RTT (counted as the raw-socket floor's time), a pooled call takes "
            f"{x(run.ratio('dk', 'raw', 'http', '10'))} RTT, a new HTTP connection "
            f"{x(run.ratio('dk_new', 'raw', 'http', '10'))} and a new HTTPS connection "
            f"{x(run.ratio('dk_new', 'raw', 'https', '10'))}, whichever library makes it "
            f"(urllib3: {x(run.ratio('urllib3_new', 'raw', 'https', '10'))} over HTTPS)."
        )
    items.append(text)
    sweeps = [
        (threads, row) for threads, row in ((t, run.concurrency(t)) for t in (1, 4, 16, 64)) if row
    ]
    if sweeps:
        ours = [
            (threads, row[key])
            for threads, row in sweeps
            for key in ("dk_map", "dk_submit")
            if key in row
        ]
        bounded = all(r["connections"] <= t and not r.get("discarded") for t, r in ours)
        session = [(t, row["requests"]) for t, row in sweeps if t > 10 and "requests" in row]
        text = "**Concurrency.** `map` and `submit` " + (
            "never opened more connections than the pool holds and never discarded one."
            if bounded
            else "opened more connections than the pool holds, or discarded some: see the "
            "`c` and `d` columns."
        )
        if session:
            counts = " and ".join(f"{r['connections']:,}" for _, r in session)
            threads = " or ".join(str(t) for t, _ in session)
            text += (
                f" A `requests.Session` shared by {threads} threads keeps only 10 connections, "
                f"so it opened {counts} connections and threw most of them away (the `d` column)."
            )
        items.append(text)
    text = asyncio_finding(run)
    if text:
        items.append(text)
    memory = run.results.get("memory") or {}
    growth = [m.get("growth_mib") for m in memory.values() if "growth_mib" in m]
    if growth:
        most = max(growth)
        few, many = next(iter(memory.values()))["few"], next(iter(memory.values()))["many"]
        items.append(
            f"**Memory.** {many:,} calls peak at "
            + (
                f"the same RSS as {few:,} calls. Nothing is kept per call."
                if most == 0
                else f"{most:+.2f} MiB over {few:,} calls."
            )
        )
    return "\n".join(bullet(item) for item in items) + "\n"


def asyncio_finding(run: Run) -> str:
    """The AsyncDispatcher against aiohttp, the sync map and httpx; "" when not measured."""
    fast = run.async_ratios("concurrency", "aiohttp")
    late = run.async_ratios("delayed", "aiohttp")
    if not fast and not late:
        return ""
    cpu = [
        *run.async_ratios("concurrency", "aiohttp", "cpu_median").values(),
        *run.async_ratios("delayed", "aiohttp", "cpu_median").values(),
    ]
    parts = []
    if fast:
        parts.append(
            f"{spread(list(fast.values()))} {TIMES} its calls/s at the fast endpoint "
            f"({levels_text(list(fast))} in flight)"
        )
    if late:
        parts.append(
            f"{spread(list(late.values()))} {TIMES} at the endpoint that answers "
            f"{run.delay} ms late ({levels_text(list(late))})"
        )
    text = (
        "**asyncio.** `AsyncDispatcher.map` against hand-written aiohttp + orjson on the same "
        f"pool and session settings: {' and '.join(parts)}, at {spread(cpu)} {TIMES} its CPU "
        "time per call."
    )
    sync = {
        level: ratio
        for level, ratio in run.async_ratios("concurrency", "dk_map").items()
        if level >= checks.OVER_SYNC_FROM
    }
    if sync:
        text += (
            f" Against the threaded `Dispatcher.map` it does {spread(list(sync.values()))} "
            f"{TIMES} the calls/s from {levels_text(list(sync))} in flight (fast endpoint)."
        )
    httpx = [
        checks.ratio((rows.get("httpx_async") or {}).get("median"),
                     (rows.get("aiohttp") or {}).get("median"))
        for section in ("concurrency", "delayed")
        for rows in run.levels(section).values()
    ]  # fmt: skip
    measured = [r for r in httpx if r is not None]
    failed = sorted(
        {
            level
            for section in ("concurrency", "delayed")
            for level, rows in run.levels(section).items()
            if (rows.get("httpx_async") or {}).get("error")
        }
    )
    if measured:
        text += (
            f" `httpx.AsyncClient` managed {spread(measured)} {TIMES} aiohttp's calls/s"
            + (
                f" and did not finish at {', '.join(f'{n:,}' for n in failed)} in flight"
                if failed
                else ""
            )
            + "."
        )
    memory = run.results.get("memory_in_flight") or {}
    growth = memory.get("growth_mib") or {}
    if "dk_async" in growth and "aiohttp" in growth:
        text += (
            f" With {memory.get('in_flight', 0):,} calls in flight the AsyncDispatcher's RSS "
            f"grew by {growth['dk_async']:.1f} MiB, aiohttp's by {growth['aiohttp']:.1f} MiB."
        )
    return text


#: Where the docs say what the AsyncDispatcher spends its time on.
ASYNC_TIME = "[where the time goes](#the-asyncdispatcher)"


def why(run: Run, check: checks.Check) -> str:
    """Why a target stands where it does: :data:`WHY`, or for the asyncio ones from the run."""
    if check.name in WHY:
        return WHY[check.name]
    if check.measured is None or "AsyncDispatcher" not in check.name:
        return ""
    level = check.name.partition(" in flight")[0].rpartition(", ")[2].replace(",", "")
    if "Dispatcher.map's calls/s" in check.name and level.isdigit():
        rows = run.levels("concurrency").get(int(level), {})
        baseline = checks.ratio(
            (rows.get("aiohttp") or {}).get("median"), (rows.get("dk_map") or {}).get("median")
        )
        if baseline is not None:
            return (
                f"hand-written aiohttp itself does {x(baseline, 2)} {TIMES} `Dispatcher.map` "
                "here: on 2 vCPUs shared with the server, a client's calls/s is bounded by its "
                "CPU per call"
            )
    if check.status == "FAIL" and "aiohttp's" in check.name:
        return ASYNC_TIME
    return ""


def standing(run: Run, document: str) -> str:
    lines = ["| target | status | measured | why |", "|---|---|---|---|"]
    for check in run.checks:
        measured = "—" if check.measured is None else f"{check.measured:.2f}{check.unit}"
        name = check.name.replace("<=", "≤").replace(">=", "≥")
        lines.append(f"| {name} | {check.status} | {measured} | {why(run, check)} |")
    return "\n".join(lines) + "\n"


def asyncio_block(run: Run, document: str) -> str:
    """The asyncio figures for docs/async.md: the same sentence as the findings, dated."""
    text = asyncio_finding(run)
    if not text:
        return "The last full run did not measure the asyncio clients.\n"
    source = (
        f"A full run of `python -m benchmarks`, {run.date}, {run.commit}; "
        "the method and every level are in [benchmarks.md](benchmarks.md)."
    )
    return wrap(f"{text} ({source})") + "\n"


RENDER: dict[str, Callable[[Run, str], str]] = {
    "asyncio": asyncio_block,
    "headline": headline,
    "results": results_block,
    "findings": findings,
    "standing": standing,
}


# -- documents ---------------------------------------------------------------------------


def load(path: Path = RESULTS) -> Run:
    return Run(json.loads(path.read_text(encoding="utf-8")))


def rewrite(text: str, document: str, run: Run) -> str:
    """``text`` with every block of ``document`` written anew from ``run``."""
    found = [m.group("name") for m in BLOCK.finditer(text)]
    expected = list(DOCUMENTS[document])
    if found != expected:
        raise Stale(f"{document}: blocks {found}, expected {expected} (markers damaged?)")

    def block(match: re.Match[str]) -> str:
        body = RENDER[match.group("name")](run, document)
        return f"{match.group('begin')}{body}{match.group('end')}"

    return BLOCK.sub(block, text)


def stale(run: Run | None = None, root: Path = ROOT) -> list[str]:
    """The documents whose blocks differ from what :func:`rewrite` would write."""
    run = run or load()
    out = []
    for document in DOCUMENTS:
        text = (root / document).read_text(encoding="utf-8")
        if rewrite(text, document, run) != text:
            out.append(document)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.partition("\n")[0])
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="copy this benchmarks.json (a full run's) to docs/benchmark-results.json first",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when a block is stale"
    )
    args = parser.parse_args(argv)
    if args.source is not None:
        if args.check:
            parser.error("--from and --check exclude each other")
        shutil.copyfile(args.source, RESULTS)
        print(f"copied {args.source} to {RESULTS.relative_to(ROOT)}")
    run = load()
    if args.check:
        out = stale(run)
        for document in out:
            print(f"{document}: stale; run {COMMAND}", file=sys.stderr)
        return 1 if out else 0
    for document in DOCUMENTS:
        path = ROOT / document
        text = path.read_text(encoding="utf-8")
        new = rewrite(text, document, run)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {document}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
