"""A one-line progress display for long loops (no dependency; quiet when not a terminal)."""
from __future__ import annotations

import sys
import time


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:d}:{s % 60:02d}"


class Progress:
    """Redraws ``prefix [####....] i/n elapsed<eta postfix`` on stderr at most 10 times a second.

    When stderr is not a terminal, only ``close`` prints (one line per loop), so logs stay short.
    """

    def __init__(self, total: int, prefix: str = "", enabled: bool = True, stream=None):
        self.total, self.prefix, self.stream = max(total, 1), prefix, stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last = time.perf_counter()
        self.count, self.postfix = 0, ""

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.count += n
        self.postfix = postfix or self.postfix
        now = time.perf_counter()
        if self.live and (now - self.last > 0.1 or self.count >= self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        done = min(self.count / self.total, 1.0)
        elapsed = now - self.start
        eta = elapsed / done - elapsed if done > 0 else 0.0
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        line = f"{self.prefix} [{bar}] {self.count}/{self.total} {format_seconds(elapsed)}<{format_seconds(eta)} {self.postfix}"
        self.stream.write(("\r" + line + "\x1b[K") if self.live else line)
        self.stream.write(end)
        self.stream.flush()

    def close(self, postfix: str = "") -> None:
        self.postfix = postfix or self.postfix
        if self.enabled:
            self._draw(time.perf_counter(), end="\n")
