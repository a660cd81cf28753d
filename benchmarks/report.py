"""What a run leaves: the printed tables, the JSON results and the PNG plot."""

from __future__ import annotations

import json
import os
import platform
import ssl
import subprocess
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks import clients
from benchmarks.checks import Check

PACKAGES = ("dispatchkit", "urllib3", "requests", "httpx", "orjson", "pluggy", "tenacity",
            "trustme", "matplotlib", "aiohttp", "httpcore", "anyio", "sniffio")  # fmt: skip


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
    }
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def commit() -> dict[str, Any]:
    """The commit measured, and the Python files under src/ and plugins/ that differ from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--untracked-files=all", "--", "src", "plugins")
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip() or None,
        "uncommitted": sorted(
            line[3:] for line in changed.splitlines() if line.rstrip().endswith(".py")
        ),
    }


def machine() -> dict[str, Any]:
    model = None
    memory = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model or platform.processor() or None,
        "memory": memory,
        "kernel": platform.release(),
        "system": platform.system(),
        "machine": platform.machine(),
        "loadavg_at_start": os.getloadavg(),
    }


# -- tables ----------------------------------------------------------------------------


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _x(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def sequential_table(results: dict[str, Any]) -> str:
    """Loopback µs per call (and the ratio to dispatchkit), then each RTT's ms per call."""
    loop = (results.get("loopback") or {}).get("sequential", {})
    runs = (results.get("rtt") or {}).get("runs", {})
    columns: list[tuple[str, dict[str, Any], float]] = [
        (f"loopback {s.upper()} us", loop[s], 1.0) for s in ("http", "https") if s in loop
    ]
    for rtt, matrix in runs.items():
        for s in ("http", "https"):
            if s in matrix.get("sequential", {}):
                columns.append((f"{rtt} ms RTT {s.upper()} ms", matrix["sequential"][s], 1e-3))
    if not columns:
        return ""
    keys = [k for k in clients.SEQUENTIAL if any(k in rows for _, rows, _ in columns)]
    header = ["client", *(title for title, _, _ in columns), "conns/call"]
    lines = [header]
    for key in keys:
        line = [clients.SEQUENTIAL[key].label]
        for _, rows, scale in columns:
            row = rows.get(key) or {}
            base = (rows.get("dk") or {}).get("median")
            med = row.get("median")
            if row.get("error") and not med:
                line.append("error")
            elif scale == 1.0:
                line.append(f"{_us(med)} {_x(med, base)}")
            else:
                line.append(f"{med * scale:.2f} {_x(med, base)}" if med else "-")
        first: dict[str, Any] = next((rows[key] for _, rows, _ in columns if key in rows), {})
        conns, total = first.get("connections"), first.get("total_calls")
        line.append(f"{conns / total:.2f}" if conns is not None and total else "-")
        lines.append(line)
    return _grid(lines)


def cpu_table(results: dict[str, Any]) -> str:
    """Loopback client CPU µs per call (this process), and the ratio to dispatchkit's."""
    loop = (results.get("loopback") or {}).get("sequential", {})
    schemes = [s for s in ("http", "https") if s in loop]
    if not schemes:
        return ""
    lines = [["client", *(f"{s.upper()} cpu us" for s in schemes)]]
    for key, spec in clients.SEQUENTIAL.items():
        if not any(key in loop[s] for s in schemes):
            continue
        line = [spec.label]
        for s in schemes:
            cpu = (loop[s].get(key) or {}).get("cpu_median")
            base = (loop[s].get("dk") or {}).get("cpu_median")
            line.append(f"{_us(cpu)} {_x(cpu, base)}")
        lines.append(line)
    return _grid(lines)


#: Ratio columns of the concurrency tables: (title, numerator, denominator).
RATIOS = (("map/urllib3", "dk_map", "urllib3"), ("async/aiohttp", "dk_async", "aiohttp"),
          ("async/map", "dk_async", "dk_map"))  # fmt: skip


def _by_level(matrix: dict[str, Any], section: str) -> dict[str, Any]:
    found: dict[str, Any] = (matrix.get(section) or {}).get("http") or {}
    return found


def _cell_error(row: dict[str, Any]) -> str:
    error = str(row.get("error") or "")
    if error.startswith("not run"):
        return "not run"
    if error.startswith("BatchTimeout") or "Timeout" in error.partition(":")[0]:
        return "timed out"
    return "error" if error else "-"


def concurrency_table(
    results: dict[str, Any], title: str, matrix: dict[str, Any], section: str = "concurrency"
) -> str:
    """Calls/s by calls in flight: every concurrent client, connections, and the ratios."""
    by_level = _by_level(matrix, section)
    if not by_level:
        return ""
    keys = [k for k in clients.CONCURRENT if any(k in rows for rows in by_level.values())]
    ratios = [r for r in RATIOS if {r[1], r[2]} <= set(keys)]
    header = [f"{title} in flight", *(clients.CONCURRENT[k].short for k in keys)]
    lines = [header + [name for name, _, _ in ratios]]
    for level, rows in by_level.items():
        line = [level]
        for key in keys:
            row = rows.get(key)
            if row is None:
                line.append("")
                continue
            if not row.get("median"):
                line.append(_cell_error(row))
                continue
            cell = f"{row['median']:,.0f}/s"
            if row.get("batch") and row.get("calls") and row["calls"] < row["batch"]:
                cell += "*"
            if row.get("connections") is not None:
                cell += f" {row['connections']}c"
            if row.get("discarded"):
                cell += f" {row['discarded']}d"
            line.append(cell)
        for _, a, b in ratios:
            line.append(_x((rows.get(a) or {}).get("median"), (rows.get(b) or {}).get("median")))
        lines.append(line)
    return _grid(lines)


def concurrency_cpu_table(
    results: dict[str, Any], title: str, matrix: dict[str, Any], section: str = "concurrency"
) -> str:
    """This process's CPU µs per call by calls in flight (every thread of it)."""
    by_level = _by_level(matrix, section)
    keys = [
        k
        for k in clients.CONCURRENT
        if any((rows.get(k) or {}).get("cpu_median") for rows in by_level.values())
    ]
    if not keys:
        return ""
    ratios = [r for r in RATIOS[1:] if {r[1], r[2]} <= set(keys)]
    header = [f"{title} in flight", *(clients.CONCURRENT[k].short for k in keys)]
    lines = [header + [name for name, _, _ in ratios]]
    for level, rows in by_level.items():
        line = [level]
        for key in keys:
            row = rows.get(key)
            line.append("" if row is None else _us(row.get("cpu_median")))
        for _, a, b in ratios:
            line.append(
                _x((rows.get(a) or {}).get("cpu_median"), (rows.get(b) or {}).get("cpu_median"))
            )
        lines.append(line)
    return _grid(lines)


def concurrency_notes(matrix: dict[str, Any], section: str) -> list[str]:
    """What went wrong where, and which samples were cut short."""
    notes: list[str] = []
    short = []
    for level, rows in _by_level(matrix, section).items():
        for key, row in rows.items():
            short_name = clients.CONCURRENT[key].short if key in clients.CONCURRENT else key
            if row.get("error"):
                notes.append(f"  {short_name} at {level}: {str(row['error'])[:160]}")
            elif row.get("batch") and row.get("calls") and row["calls"] < row["batch"]:
                short.append(
                    f"{short_name} at {level}: {row['calls']:,} of {row['batch']:,} calls, "
                    f"rounds: {len(row.get('samples') or [])}"
                )
    if short:
        notes.insert(0, "  * fewer calls per sample (too slow for the batch): " + "; ".join(short))
    return notes


def checks_table(checks: list[Check]) -> str:
    lines = [["status", "target", "measured"]]
    for check in checks:
        measured = "-" if check.measured is None else f"{check.measured:.2f}{check.unit}"
        lines.append([check.status, check.name, measured])
    return _grid(lines)


def _grid(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def text(results: dict[str, Any], checks: list[Check]) -> str:
    meta = results["meta"]
    m, v = meta["machine"], meta["versions"]
    parts = [
        f"dispatchkit {v['dispatchkit']} | Python {v['python']} | urllib3 {v['urllib3']} | "
        f"requests {v['requests']} | httpx {v['httpx']} | orjson {v['orjson']}",
        f"{m['cpu_count']} CPUs ({m['cpu_model']}), kernel {m['kernel']} | mode: {meta['mode']}",
        f"server: {meta['server']} | dispatchkit plugins: {', '.join(meta['plugins'])}",
    ]
    loop = results.get("loopback") or {}
    for scheme, by_conns in (loop.get("capacity") or {}).items():
        rates = ", ".join(f"{n}: {r:,.0f}" for n, r in by_conns.items())
        parts.append(
            f"target capacity {scheme.upper()}, req/s by connections (raw-socket probe): {rates}"
        )
    delay = loop.get("delay_ms") or clients.DELAY_MS
    for scheme, by_conns in (loop.get("delayed_capacity") or {}).items():
        rates = ", ".join(
            f"{int(n):,}: {r:,.0f} (ideal {int(n) * 1000 / delay:,.0f})"
            for n, r in by_conns.items()
        )
        parts.append(f"target capacity {scheme.upper()}, {delay} ms endpoint, req/s: {rates}")
    if missing := loop.get("missing"):
        parts.append("not installed, left out: " + ", ".join(sorted(set(missing.values()))))
    parts += [
        "",
        "Sequential GET of one envelope: median per call over alternating rounds; "
        "Nx = time / dispatchkit's in the same column",
        sequential_table(results),
    ]
    cpu = cpu_table(results)
    if cpu:
        parts += [
            "",
            "The same on loopback, as this process's CPU time per call (no wake-ups)",
            cpu,
        ]
    rtt = results.get("rtt") or {}
    if rtt.get("note"):
        parts.append(f"RTT: {rtt['note']}")
    for title, matrix in [("loopback", loop)] + [
        (f"{k} ms RTT", m) for k, m in (rtt.get("runs") or {}).items()
    ]:
        for section in ("concurrency", "delayed"):
            table = concurrency_table(results, title, matrix, section)
            if not table:
                continue
            where = (
                f"the endpoint answering {matrix.get('delay_ms')} ms late"
                if section == "delayed"
                else "the fast endpoint"
            )
            parts += ["", f"Concurrent GETs over HTTP, {where}: calls/s (median), N in flight "
                      "(N threads, or N tasks on one event loop; pool size N), c = connections "
                      "opened, d = 'pool is full, discarding connection'", table]  # fmt: skip
            cpu = concurrency_cpu_table(results, title, matrix, section)
            if cpu:
                parts += ["", f"The same, {where}: this process's CPU time per call, us "
                          "(every thread; the server runs in another process)", cpu]  # fmt: skip
            parts += concurrency_notes(matrix, section)
    for scheme, mem in (results.get("memory") or {}).items():
        if "error" in mem:
            parts.append(f"\nmemory {scheme.upper()}: not measured: {mem['error'][-300:]}")
            continue
        parts.append(
            f"\nmemory {scheme.upper()}: peak RSS {mem['few']:,} calls {_kib(mem['few_kib'])}, "
            f"{mem['many']:,} calls {_kib(mem['many_kib'])}: growth {mem['growth_mib']:+.2f} MiB"
        )
    in_flight = results.get("memory_in_flight") or {}
    if "error" in in_flight:
        parts.append(f"\nmemory in flight: not measured: {in_flight['error'][-300:]}")
    elif in_flight:
        runs = in_flight.get("runs") or {}
        shown = "; ".join(
            f"{clients.CONCURRENT[key].short} +{growth:.1f} MiB ("
            + "/".join(f"{(r['peak_kib'] - r['before_kib']) / 1024:.1f}" for r in runs.get(key, []))
            + ")"
            for key, growth in in_flight.get("growth_mib", {}).items()
        )
        parts.append(
            f"\nmemory, {in_flight['in_flight']:,} calls in flight ({in_flight['calls']:,} calls, "
            f"{in_flight['delay_ms']} ms endpoint, a fresh process each): RSS growth {shown}"
        )
    parts += ["", checks_table(checks)]
    return "\n".join(parts)


def _kib(values: list[int]) -> str:
    return "/".join(f"{v / 1024:.1f}" for v in values) + " MiB"


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


# -- plot --------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> bool:
    """Write the PNG; ``False`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    loop = results.get("loopback") or {}
    runs = (results.get("rtt") or {}).get("runs") or {}
    panels: list[Callable[[Any], None]] = [
        lambda ax: _bars(ax, loop.get("sequential", {}), "loopback: µs per call (log scale)", 1.0)
    ]
    if runs:
        last = list(runs)[-1]
        panels.append(
            lambda ax: _bars(
                ax, runs[last].get("sequential", {}), f"{last} ms RTT: ms per call", 1e-3
            )
        )
    delay = loop.get("delay_ms")
    for field in ("median", "cpu_median"):
        for section, where in (
            ("concurrency", "fast endpoint"),
            ("delayed", f"{delay} ms endpoint"),
        ):
            by_level = _by_level(loop, section)
            if any((r or {}).get(field) for rows in by_level.values() for r in rows.values()):
                panels.append(_line_panel(by_level, where, field))
    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(7.0 * columns, 6.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for draw, ax in zip(panels, flat, strict=False):
        draw(ax)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    meta = results["meta"]
    fig.suptitle(
        f"dispatchkit {meta['versions']['dispatchkit']} vs peers — {meta['machine']['cpu_count']} "
        f"CPUs, Python {meta['versions']['python']}, {meta['server']}",
        fontsize=10,
    )
    # The line panels share one legend, under the figure: inside, it hid the fastest clients.
    found: dict[str, Any] = {}
    for ax in flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if ax.get_legend() is None:
                found.setdefault(label, handle)
    order = [spec.label for spec in clients.CONCURRENT.values() if spec.label in found]
    bottom = 0.0
    if order:
        fig.legend([found[label] for label in order], order, loc="lower center", ncol=2,
                   fontsize=8, frameon=False)  # fmt: skip
        bottom = 0.16 / rows
    fig.tight_layout(rect=(0.0, bottom, 1.0, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bars(ax: Any, by_scheme: dict[str, Any], title: str, scale: float) -> None:
    keys = [k for k in clients.SEQUENTIAL if any(k in rows for rows in by_scheme.values())]
    keys.reverse()  # the floor on top
    height = 0.8 / max(len(by_scheme), 1)
    colors = {"http": "#4c72b0", "https": "#dd8452"}
    for n, (scheme, rows) in enumerate(by_scheme.items()):
        values = [((rows.get(k) or {}).get("median") or 0) * scale for k in keys]
        positions = [i + (n - (len(by_scheme) - 1) / 2) * height for i in range(len(keys))]
        ax.barh(positions, values, height=height, label=scheme.upper(), color=colors.get(scheme))
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels(
        [clients.SEQUENTIAL[k].label for k in keys], fontsize=8,
        fontweight="normal",
    )  # fmt: skip
    for label, key in zip(ax.get_yticklabels(), keys, strict=True):
        if key.startswith("dk"):
            label.set_fontweight("bold")
    if scale == 1.0:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)


def _line_panel(by_level: dict[str, Any], where: str, field: str) -> Callable[[Any], None]:
    return lambda ax: _lines(ax, by_level, where, field)


def _lines(ax: Any, by_level: dict[str, Any], where: str, field: str) -> None:
    levels = [int(n) for n in by_level]
    for key, spec in clients.CONCURRENT.items():
        points = [
            (n, value)
            for n in levels
            if (value := (by_level[str(n)].get(key) or {}).get(field)) is not None
        ]
        if points:
            ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=spec.label,
                    linestyle="--" if key in clients.ASYNCIO else "-",
                    linewidth=2.2 if key.startswith("dk") else 1.2)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels)
    ax.set_xticklabels([f"{n:,}" for n in levels])
    ax.set_xlabel("calls in flight N (N threads or N asyncio tasks; pool size N)")
    if field == "median":
        ax.set_title(f"loopback HTTP, {where}: calls per second", fontsize=10)
    else:
        ax.set_yscale("log")
        ax.set_title(f"loopback HTTP, {where}: client CPU µs per call (log scale)", fontsize=10)
    if field == "median":
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)  # one legend for every such panel, under the figure (see plot)
