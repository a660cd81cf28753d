"""Start the Node.js task-server peer (``tests/peers/taskserver.mjs``) for a test.

The peer is a second, non-Python implementation of the wire protocol of
docs/protocol.md. It prints ``LISTENING http://127.0.0.1:<port>`` once it is
ready and exits by itself when its stdin closes, so it cannot outlive the test
process even if this helper never gets to clean up.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["NODE", "PEER_SCRIPT", "node_peer"]

NODE = shutil.which("node")
PEER_SCRIPT = Path(__file__).resolve().parent.parent / "peers" / "taskserver.mjs"
_PREFIX = "LISTENING "
_STOP_TIMEOUT = 5.0


def _read_first_line(stream: IO[bytes], lines: queue.Queue[bytes]) -> None:
    try:
        lines.put(stream.readline())
    except (OSError, ValueError):  # the pipe was closed under us
        lines.put(b"")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=_STOP_TIMEOUT)


def _stderr_text(stderr: IO[bytes]) -> str:
    stderr.flush()
    stderr.seek(0)
    text = stderr.read(8192).decode("utf-8", "replace").strip()
    return f"; stderr:\n{text}" if text else "; nothing on stderr"


@contextlib.contextmanager
def node_peer(timeout: float = 10.0) -> Iterator[str]:
    """Run the Node peer on a free loopback port and yield its base URL.

    ``timeout`` bounds the wait for the peer's ``LISTENING`` line. Raises
    ``RuntimeError`` (quoting the peer's stderr) if node is missing, exits early
    or does not announce itself in time.
    """
    if NODE is None:
        raise RuntimeError("node_peer: no `node` executable on PATH")
    if not PEER_SCRIPT.is_file():
        raise RuntimeError(f"node_peer: peer script not found: {PEER_SCRIPT}")
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [NODE, str(PEER_SCRIPT), "--port", "0", "--host", "127.0.0.1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert proc.stdout is not None
        lines: queue.Queue[bytes] = queue.Queue(maxsize=1)
        reader = threading.Thread(
            target=_read_first_line,
            args=(proc.stdout, lines),
            name="node-peer-stdout",
            daemon=True,
        )
        try:
            reader.start()
            try:
                line = lines.get(timeout=timeout).decode("utf-8", "replace").strip()
            except queue.Empty:
                _stop(proc)
                raise RuntimeError(
                    f"node_peer: no LISTENING line within {timeout:g}s from "
                    f"{NODE} {PEER_SCRIPT}{_stderr_text(stderr)}"
                ) from None
            if not line.startswith(_PREFIX):
                _stop(proc)
                what = f"printed {line!r}" if line else f"exited (code {proc.returncode})"
                raise RuntimeError(
                    f"node_peer: {NODE} {PEER_SCRIPT} {what} instead of a "
                    f"LISTENING line{_stderr_text(stderr)}"
                )
            yield line[len(_PREFIX) :]
        finally:
            _stop(proc)
            # The child is gone, so the reader has seen its line or EOF.
            reader.join(timeout=_STOP_TIMEOUT)
            proc.stdout.close()
