"""Starting and stopping what the clients talk to: the target (or nginx) and the RTT relay.

Every process started here is a context manager that stops it in ``finally``
(stdin closed, then terminate, then kill; every wait bounded). ``prefix`` runs
a process inside a network namespace (``["ip", "netns", "exec", name]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = '{"status":"success","retval":100}'
#: Every address the certificate is good for: loopback and the server's netns address.
CERT_NAMES = ("127.0.0.1", "localhost", "10.213.0.2")
START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Certs:
    """A throwaway CA and a server certificate signed by it (made by trustme)."""

    ca: str
    cert: str
    key: str


def make_certs(directory: Path) -> Certs | None:
    """Write a CA and a server certificate under ``directory``; ``None`` without trustme."""
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    issued = ca.issue_cert(*CERT_NAMES)
    paths = Certs(
        str(directory / "ca.pem"), str(directory / "server.pem"), str(directory / "key.pem")
    )
    ca.cert_pem.write_to_path(paths.ca)
    Path(paths.cert).write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(paths.key)
    return paths


@dataclass(frozen=True)
class Running:
    """A started server: its base URLs by scheme and how to read its counters."""

    name: str
    urls: dict[str, str]
    stats: str  # "target" ({"connections", "requests"}) or "nginx" (stub_status) or ""


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line of ``proc``, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().strip()


@contextlib.contextmanager
def process(argv: Sequence[str], what: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``argv`` until the block ends; yield it with its ``LISTENING`` line's rest."""
    # A session of its own: Ctrl-C reaches only the suite, whose finally stops this.
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        line = read_line(proc, START_TIMEOUT)
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"{what} did not start (said {line!r}): {' '.join(argv)}")
        yield proc, line.removeprefix("LISTENING ")
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str], signum: int = signal.SIGTERM) -> None:
    """Close stdin (the polite stop), then signal, then kill: each wait bounded."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.send_signal(signum)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def target(
    host: str, certs: Certs | None, workers: int = 1, prefix: Sequence[str] = ()
) -> Iterator[Running]:
    """The Python target server (``benchmarks/target.py``) on ``host``, HTTP and HTTPS."""
    argv = [*prefix, sys.executable, "-m", "benchmarks.target", "--host", host]
    argv += ["--workers", str(workers)]
    if certs is not None:
        argv += ["--tls-port", "0", "--cert", certs.cert, "--key", certs.key]
    with process(argv, "the target server") as (_, rest):
        urls = {url.partition(":")[0]: url for url in rest.split()}
        name = f"Python selectors target ({workers} process{'es' if workers > 1 else ''})"
        yield Running(name, urls, "target")


NGINX_CONF = """\
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen {host}:{http_port} reuseport;
        {tls}
        location = /stats {{ stub_status; }}
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def free_port(host: str, prefix: Sequence[str]) -> int:
    """A port free on ``host`` (in the namespace of ``prefix``) a moment ago."""
    if not prefix:
        with socket.create_server((host, 0)) as sock:
            port: int = sock.getsockname()[1]
            return port
    code = f"import socket; s = socket.create_server(({host!r}, 0)); print(s.getsockname()[1])"
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=15
    )
    return int(out.stdout)


def nginx_path() -> str | None:
    return shutil.which("nginx")


@contextlib.contextmanager
def nginx(
    host: str, certs: Certs | None, workers: int = 1, prefix: Sequence[str] = ()
) -> Iterator[Running]:
    """nginx answering the envelope from a ``return 200`` (``/stats`` is its stub_status)."""
    binary = nginx_path()
    if binary is None:
        raise RuntimeError("nginx is not on PATH")
    version = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    name = (version.stderr.strip().partition(":")[2].strip() or "nginx") + f" ({workers} worker)"
    with tempfile.TemporaryDirectory(prefix="dkbench-nginx-") as tmp:
        http_port = free_port(host, prefix)
        urls = {"http": f"http://{host}:{http_port}"}
        tls = ""
        if certs is not None:
            https_port = free_port(host, prefix)
            urls["https"] = f"https://{host}:{https_port}"
            tls = (
                f"listen {host}:{https_port} ssl reuseport; "
                f"ssl_certificate {certs.cert}; ssl_certificate_key {certs.key};"
            )
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                workers=workers,
                tmp=tmp,
                # As root, nginx drops its workers to "nobody", whose group may not exist.
                user="user root;" if os.geteuid() == 0 else "",
                host=host,
                http_port=http_port,
                tls=tls,
                body=BODY,
            )
        )
        # nginx prints nothing when ready: a launcher says LISTENING once the port answers.
        launcher = [
            *prefix,
            sys.executable,
            "-m",
            "benchmarks.launch",
            "--wait",
            f"{host}:{http_port}",
            "--",
            binary,
            "-p",
            tmp,
            "-c",
            str(conf),
        ]
        with process(launcher, "nginx"):
            yield Running(name, urls, "nginx")


@contextlib.contextmanager
def relay(
    rtt_ms: float, listen_host: str, upstreams: dict[str, str], prefix: Sequence[str] = ()
) -> Iterator[dict[str, str]]:
    """The user-space RTT relay in front of ``upstreams`` (base URL by scheme)."""
    argv = [*prefix, sys.executable, "-m", "benchmarks.relay", "--rtt-ms", str(rtt_ms)]
    argv += ["--listen-host", listen_host]
    schemes = list(upstreams)
    for scheme in schemes:
        argv += ["--upstream", upstreams[scheme].partition("://")[2]]
    with process(argv, "the RTT relay") as (_, rest):
        ports = rest.split()
        yield {s: f"{s}://{listen_host}:{p}" for s, p in zip(schemes, ports, strict=True)}


class Stats:
    """Reads a server's counters over one keep-alive connection, opened once."""

    def __init__(self, base: str, kind: str) -> None:
        from benchmarks.clients import Endpoint, RawSocket

        self.kind = kind
        self._raw = RawSocket(Endpoint(base), "/stats") if kind else None

    def connections(self) -> int | None:
        """Connections the server has accepted so far (``None``: it cannot say)."""
        if self._raw is None:
            return None
        try:
            body = self._raw.fetch()
        except OSError:
            return None
        if self.kind == "target":
            value: int = json.loads(body)["connections"]
            return value
        # nginx stub_status: "server accepts handled requests\n N N N"
        lines = body.decode().splitlines()
        try:
            return int(lines[2].split()[0])
        except (IndexError, ValueError):
            self._raw.close()
            self._raw = None  # stub_status is not compiled in
            return None

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
