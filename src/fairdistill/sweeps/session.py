"""What every sweep invocation shares, whichever launcher runs it: the summary, the one-line
progress, the stop signals, the environment of a run's process, the telling line of a log."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, RunDirError
from ..progress import format_seconds
from ..rundir import RunDir, write_json
from .plan import RunPlan
from .spec import STATUS


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def child_env() -> dict:
    """The environment of a run's process: this fairdistill first on the import path."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def last_error(log: Path) -> str:
    """The most telling line of a failed run's log: its error line, else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "error" in ln.lower()]
    return ((errors or lines or ["empty log"])[-1])[:300]


@dataclass
class SweepSummary:
    """What one ``run_sweep`` call did."""

    runs: int
    counts: dict
    problems: list
    wall_s: float

    @property
    def ok(self) -> bool:
        """Every run finished (``busy``: left to a job or process elsewhere, is not finished)."""
        return not any(self.counts.get(k) for k in ("failed", "skipped", "conflict", "busy", "interrupted"))


class SweepProgress:
    """Overall progress as one line: runs done/total, failures, elapsed, ETA.

    Events (a run started, finished, failed) are printed as lines, each with the progress in
    front; on a terminal the progress line is also redrawn every second.
    """

    def __init__(self, plans: list[RunPlan], stream):
        self.plans, self.stream = plans, stream
        self.live = getattr(stream, "isatty", lambda: False)()
        self.t0 = self.last = time.perf_counter()
        self.ended_now = 0  # runs this invocation ran to an end (done or failed)

    def line(self) -> str:
        c = Counter(p.status for p in self.plans)
        elapsed = time.perf_counter() - self.t0
        remaining = c["pending"] + c["running"] + c["queued"]
        eta = format_seconds(elapsed / self.ended_now * remaining) if self.ended_now else "?"
        queued = f", {c['queued']} queued" if c["queued"] else ""
        return (f"[{c['done']}/{len(self.plans)} done, {c['failed']} failed, {c['skipped'] + c['conflict']} skipped, "
                f"{c['running']} running{queued}; {format_seconds(elapsed)} elapsed, ETA {eta}]")

    def event(self, text: str) -> None:
        clear = "\r\x1b[K" if self.live else ""
        self.stream.write(f"{clear}{self.line()} {text}\n")
        self.stream.flush()
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.live and (force or now - self.last >= 1.0):
            self.last = now
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (a scheduler, ``kill``) and SIGINT raise KeyboardInterrupt inside, so a sweep
    stops as on Ctrl-C, also when SIGINT came in ignored (a script's background job inherits it
    so); the previous handlers come back after. Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if previous[signal.SIGINT] in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def result_line(rd: RunDir) -> str:
    """The finished run's headline metrics (the task's summary line), or what is wrong with its
    ``result.json``."""
    from ..tasks import TASKS

    try:
        result = rd.read_result()
        return TASKS.get(result.get("task", "classification")).summary(result["final"])
    except (RunDirError, KeyError, TypeError, ConfigError) as e:
        return f"result.json damaged ({e})"


def drive(sweep, spec, plans: list[RunPlan], record: dict) -> SweepSummary:
    """Run ``sweep.loop()`` under :func:`stop_signals` (an interrupt calls ``sweep.interrupt()``
    and propagates); however it ends, close its progress line and write the sweep's status file
    (``STATUS`` in ``spec.out``: name, end time, wall time, ``record``'s fields, the runs' status
    counts and problems)."""
    t0 = time.perf_counter()
    try:
        with stop_signals():
            sweep.loop()
    except KeyboardInterrupt:
        sweep.interrupt()
        raise
    finally:
        sweep.progress.close()
        counts = dict(Counter(p.status for p in plans))
        problems = [f"{p.status}: {p.label}: {p.reason}" for p in plans if p.status in ("failed", "skipped", "conflict")]
        summary = SweepSummary(len(plans), counts, problems, time.perf_counter() - t0)
        write_json(Path(spec.out) / STATUS, {"sweep": spec.name, "ended": time.strftime("%Y-%m-%d %H:%M:%S"),
                                             "wall_s": summary.wall_s, **record, "counts": counts, "problems": problems})
    return summary
