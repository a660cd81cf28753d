"""A progress line on stderr: rewritten in place on a terminal, a line per tenth in CI logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``step(what)`` before each of ``total`` units of work; ``close()`` at the end."""

    def __init__(self, title: str, total: int, stream: TextIO | None = None) -> None:
        self.title = title
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._tenth = -1

    def step(self, what: str) -> None:
        self.done = min(self.done + 1, self.total)
        elapsed = time.monotonic() - self.started
        line = f"{self.title} [{self.done}/{self.total}] {elapsed:5.1f}s  {what}"
        if self.tty:
            self.stream.write(f"\r\x1b[K{line[:150]}")
        else:
            tenth = self.done * 10 // self.total
            if tenth == self._tenth:
                return
            self._tenth = tenth
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line that stays, above the progress line."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + message + "\n")
        self.stream.flush()

    def close(self) -> None:
        elapsed = time.monotonic() - self.started
        end = f"{self.title}: done in {elapsed:.1f}s"
        self.stream.write(("\r\x1b[K" if self.tty else "") + end + "\n")
        self.stream.flush()
