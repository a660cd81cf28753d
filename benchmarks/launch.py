"""Run a server that announces nothing (nginx) the way the suite runs its own.

::

    python -m benchmarks.launch --wait HOST:PORT -- COMMAND...

Starts COMMAND, prints ``LISTENING HOST:PORT`` once that port accepts a
connection (or exits non-zero after 10 s), and stops COMMAND when stdin
closes. It runs inside the server's network namespace, where the port is.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time

WAIT = 10.0


def wait_for_eof(closed: threading.Event) -> None:
    sys.stdin.read()
    closed.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--wait", required=True, help="HOST:PORT")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    host, _, port = args.wait.rpartition(":")
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if proc.poll() is not None:
                print(f"FAILED {command[0]} exited with {proc.returncode}", flush=True)
                return 1
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    print(f"FAILED {args.wait} did not answer within {WAIT:.0f} s", flush=True)
                    return 1
                time.sleep(0.05)
        print("LISTENING", args.wait, flush=True)
        stdin_closed = threading.Event()
        threading.Thread(target=wait_for_eof, args=(stdin_closed,), daemon=True).start()
        while not stdin_closed.wait(0.5):
            if proc.poll() is not None:
                return 1
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()  # nginx: fast shutdown
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


if __name__ == "__main__":
    raise SystemExit(main())
