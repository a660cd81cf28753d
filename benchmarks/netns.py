"""Real latency: two network namespaces joined by a veth pair, with round-trip time added.

The client namespace holds ``10.213.0.1``, the server namespace
``10.213.0.2``; both addresses exist only inside the namespaces, so no traffic
leaves the machine and nothing in the host's own network changes (the veth
pair is created directly inside them). Round-trip time is added by ``tc
netem`` (half on each end of the veth pair) when the kernel has it; where it
does not (``CONFIG_NET_SCH_NETEM`` unset), :mod:`benchmarks.relay` adds it in
user space, in the server's namespace. Everything is removed in ``finally``,
on Ctrl-C too; namespaces left by a run that was killed outright are removed
by the next run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

CLIENT_ADDR = "10.213.0.1"
SERVER_ADDR = "10.213.0.2"
_NAME = re.compile(r"^dkb-[cs]-(\d+)\b")


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or ``None`` when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if check and done.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class Link:
    """The two namespaces and the veth pair between them."""

    client: str
    server: str
    client_dev: str
    server_dev: str
    netem: bool  # whether the kernel can add delay on the link itself

    @staticmethod
    def prefix(namespace: str) -> list[str]:
        """The argv prefix that runs a command inside ``namespace``."""
        return ["ip", "netns", "exec", namespace]

    def set_rtt(self, rtt_ms: float) -> None:
        """Delay each direction by half of ``rtt_ms`` with netem."""
        for ns, dev in ((self.client, self.client_dev), (self.server, self.server_dev)):
            _run(*self.prefix(ns), "tc", "qdisc", "replace", "dev", dev, "root",
                 "netem", "delay", f"{rtt_ms / 2:g}ms")  # fmt: skip


def reap_stale() -> None:
    """Remove namespaces of earlier runs whose process is gone (killed with SIGKILL)."""
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        match = _NAME.match(line)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _run("ip", "netns", "del", line.split()[0], check=False)


@contextlib.contextmanager
def link() -> Iterator[Link]:
    """Make the namespaces and the link; remove them when the block ends, however it ends."""
    reap_stale()
    pid = os.getpid()
    client, server = f"dkb-c-{pid}", f"dkb-s-{pid}"
    client_dev, server_dev = f"dkb{pid}c", f"dkb{pid}s"
    try:
        _run("ip", "netns", "add", client)
        _run("ip", "netns", "add", server)
        _run("ip", "link", "add", client_dev, "netns", client, "type", "veth",
             "peer", "name", server_dev, "netns", server)  # fmt: skip
        for ns, dev, addr in ((client, client_dev, CLIENT_ADDR), (server, server_dev, SERVER_ADDR)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        probe = _run(*Link.prefix(client), "tc", "qdisc", "add", "dev", client_dev, "root",
                     "netem", "delay", "0ms", check=False)  # fmt: skip
        yield Link(client, server, client_dev, server_dev, netem=probe.returncode == 0)
    finally:
        # Deleting a namespace destroys the veth end inside it, and so the pair.
        for ns in (client, server):
            _run("ip", "netns", "del", ns, check=False)
