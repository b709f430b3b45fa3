"""A one-line progress display for long loops (no dependency; quiet when not a terminal).

:class:`Progress` draws one loop (an epoch): its bar, elapsed and remaining time, images per
second and the learning rate; with a :class:`RunClock` it adds the whole run's elapsed time and
ETA over every remaining stage and epoch.
"""
from __future__ import annotations

import sys
import time


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:d}:{s % 60:02d}"


def format_lr(lr) -> str:
    """``lr 1e-03``-style text of a learning rate ('' when there is none)."""
    return "" if lr is None else f"lr {lr:.3g}"


class RunClock:
    """Steps of a whole run: ``total`` (every step this invocation will take, over all remaining
    stages and epochs) and the time since it started; the ETA extrapolates the wall time per
    step so far, so evaluation and checkpoint time are part of it."""

    def __init__(self, total: int):
        self.total, self.done = max(int(total), 0), 0
        self.start = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self) -> float | None:
        """Seconds left (None before the first step)."""
        if self.done <= 0:
            return None
        return self.elapsed() / self.done * max(self.total - self.done, 0)

    def text(self) -> str:
        eta = self.eta()
        pct = f" {100 * self.done / self.total:.0f}%" if self.total else ""
        return f"run {format_seconds(self.elapsed())}<{'?' if eta is None else format_seconds(eta)}{pct}"


class Progress:
    """Redraws ``prefix [####....] i/n elapsed<eta N img/s lr X postfix | run elapsed<eta P%``
    on stderr at most 10 times a second.

    ``update(n, postfix, images, lr)`` counts ``n`` steps and ``images`` images (the rate is
    images over this loop's elapsed time; pass the global count under torchrun). ``clock``: the
    run's :class:`RunClock`, stepped by ``update``. When stderr is not a terminal, only
    ``close`` prints (one line per loop), so logs stay short.
    """

    def __init__(self, total: int, prefix: str = "", enabled: bool = True, stream=None, clock: RunClock | None = None):
        self.total, self.prefix, self.stream = max(total, 1), prefix, stream or sys.stderr
        self.enabled, self.clock = enabled, clock
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last = time.perf_counter()
        self.count, self.images, self.postfix, self.lr = 0, 0, "", None

    def update(self, n: int = 1, postfix: str = "", images: int = 0, lr: float | None = None) -> None:
        self.count += n
        self.images += images
        self.postfix = postfix or self.postfix
        self.lr = lr if lr is not None else self.lr
        if self.clock is not None:
            self.clock.step(n)
        now = time.perf_counter()
        if self.live and (now - self.last > 0.1 or self.count >= self.total):
            self.last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The progress text (without terminal control characters)."""
        now = time.perf_counter() if now is None else now
        done = min(self.count / self.total, 1.0)
        elapsed = now - self.start
        eta = elapsed / done - elapsed if done > 0 else 0.0
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        parts = [f"{self.prefix} [{bar}] {self.count}/{self.total} {format_seconds(elapsed)}<{format_seconds(eta)}"]
        if self.images and elapsed > 0:
            parts.append(f"{self.images / elapsed:.0f} img/s")
        parts += [p for p in (format_lr(self.lr), self.postfix) if p]
        line = " ".join(parts)
        return line + (f" | {self.clock.text()}" if self.clock is not None else "")

    def _draw(self, now: float, end: str = "") -> None:
        line = self.line(now)
        self.stream.write(("\r" + line + "\x1b[K") if self.live else line)
        self.stream.write(end)
        self.stream.flush()

    def close(self, postfix: str = "") -> None:
        self.postfix = postfix or self.postfix
        if self.enabled:
            self._draw(time.perf_counter(), end="\n")
