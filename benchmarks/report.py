"""What a run leaves: the printed tables, the JSON results and the PNG plot."""

from __future__ import annotations

import json
import os
import platform
import ssl
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks import clients
from benchmarks.checks import Check

PACKAGES = ("dispatchkit", "urllib3", "requests", "httpx", "orjson", "pluggy", "tenacity",
            "trustme", "matplotlib")  # fmt: skip


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


def concurrency_table(results: dict[str, Any], title: str, matrix: dict[str, Any]) -> str:
    by_threads = (matrix.get("concurrency") or {}).get("http") or {}
    if not by_threads:
        return ""
    keys = [k for k in clients.CONCURRENT if any(k in rows for rows in by_threads.values())]
    header = [f"{title} threads", *(clients.CONCURRENT[k].short for k in keys), "map/urllib3"]
    lines = [header]
    for threads, rows in by_threads.items():
        line = [threads]
        for key in keys:
            row = rows.get(key) or {}
            if not row.get("median"):
                line.append("error" if row.get("error") else "-")
                continue
            cell = f"{row['median']:,.0f}/s"
            if row.get("connections") is not None:
                cell += f" {row['connections']}c"
            if row.get("discarded"):
                cell += f" {row['discarded']}d"
            line.append(cell)
        dk, raw = (
            (rows.get("dk_map") or {}).get("median"),
            (rows.get("urllib3") or {}).get("median"),
        )
        line.append(_x(dk, raw))
        lines.append(line)
    return _grid(lines)


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
        table = concurrency_table(results, title, matrix)
        if table:
            parts += ["", "Concurrent GETs over HTTP: calls/s (median), c = connections opened, "
                      "d = 'pool is full, discarding connection'", table]  # fmt: skip
    for scheme, mem in (results.get("memory") or {}).items():
        if "error" in mem:
            parts.append(f"\nmemory {scheme.upper()}: not measured: {mem['error'][-300:]}")
            continue
        parts.append(
            f"\nmemory {scheme.upper()}: peak RSS {mem['few']:,} calls {_kib(mem['few_kib'])}, "
            f"{mem['many']:,} calls {_kib(mem['many_kib'])}: growth {mem['growth_mib']:+.2f} MiB"
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
    panels = 1 + bool(runs) + bool(loop.get("concurrency", {}).get("http"))
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 5.4), squeeze=False)
    ax_iter = iter(axes[0])
    _bars(next(ax_iter), loop.get("sequential", {}), "loopback: µs per call (log scale)", 1.0)
    if runs:
        last = list(runs)[-1]
        _bars(next(ax_iter), runs[last].get("sequential", {}), f"{last} ms RTT: ms per call", 1e-3)
    if loop.get("concurrency", {}).get("http"):
        _lines(next(ax_iter), loop["concurrency"]["http"])
    meta = results["meta"]
    fig.suptitle(
        f"dispatchkit {meta['versions']['dispatchkit']} vs peers — {meta['machine']['cpu_count']} "
        f"CPUs, Python {meta['versions']['python']}, {meta['server']}",
        fontsize=10,
    )
    fig.tight_layout()
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


def _lines(ax: Any, by_threads: dict[str, Any]) -> None:
    threads = [int(t) for t in by_threads]
    for key, spec in clients.CONCURRENT.items():
        values = [(by_threads[str(t)].get(key) or {}).get("median") for t in threads]
        if any(values):
            ax.plot(threads, [v or float("nan") for v in values], marker="o", label=spec.label,
                    linewidth=2.2 if key.startswith("dk") else 1.2)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(threads)
    ax.set_xticklabels([str(t) for t in threads])
    ax.set_xlabel("threads (pool size = threads)")
    ax.set_title("loopback HTTP, concurrent: calls per second", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
