"""Running a sweep locally: every (row, seed) in its own ``python -m fairdistill train``
process, at most ``jobs`` at once, teachers before the rows that need them, with one progress
line; Ctrl-C or SIGTERM stop the runs (each keeps its last checkpoint) and a re-run resumes.

Each run's process dies with the sweep (:mod:`.child`), also when the sweep is killed with
SIGKILL; SIGINT and SIGTERM stop a sweep also when it was started with SIGINT ignored (as a
non-interactive shell starts background processes). Runs that are running or queued elsewhere
(a SLURM job of the same sweep, see :mod:`.state`) are left to them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

from ..progress import format_seconds
from ..rundir import RunDir, write_json
from .jobs import process_alive, this_host
from .plan import FolderLock, RunPlan, claim_folder, describe_plan, owner_of, plan_sweep, read_marker
from .spec import LOG, MARKER, SweepSpec
from .session import SweepProgress, SweepSummary, child_env, cpu_count, drive, last_error, result_line
from .state import describe_states, plan_states


class _Sweep:
    """The scheduling loop of :func:`run_sweep`."""

    def __init__(self, spec: SweepSpec, plans: list[RunPlan], stream):
        self.spec, self.plans, self.stream = spec, plans, stream
        self.progress = SweepProgress(plans, stream)
        self.threads = max(1, cpu_count() // spec.jobs)
        self.running: dict[RunPlan, tuple[subprocess.Popen, object, float]] = {}

    def mark(self, p: RunPlan, status: str, pid: int | None = None) -> None:
        """Set ``p.status``; record it in the run's ``sweep.json`` (with the writer's process while it runs)."""
        p.status = status
        if status in ("running", "done", "failed", "interrupted"):
            writer = {"pid": pid, "host": this_host(), "sweep_pid": os.getpid()} if pid is not None else {}
            write_json(p.path / MARKER, {**owner_of(self.spec, p.row, p.seed), "status": status, "log": LOG, **writer})

    def start(self, p: RunPlan) -> None:
        p.path.mkdir(parents=True, exist_ok=True)
        self.mark(p, "running")
        argv = list(p.argv) + ([f"threads={self.threads}"] if p.cfg.threads == 0 else [])
        train = ["train", p.row.config, *argv] + (["--resume"] if p.action == "resume" else [])
        cmd = [sys.executable, "-m", "fairdistill.sweeps.child", str(os.getpid()), *train]
        log = open(p.path / LOG, "a")
        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} sweep {self.spec.name}: fairdistill {' '.join(train)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env())
        self.mark(p, "running", pid=proc.pid)
        self.running[p] = (proc, log, time.perf_counter())
        self.progress.event(f"{'resume' if p.action == 'resume' else 'start'} {p.label}")

    def finish(self, p: RunPlan) -> None:
        proc, log, t0 = self.running.pop(p)
        log.close()
        p.wall_s = time.perf_counter() - t0
        self.progress.ended_now += 1
        rd = RunDir(p.path)
        if proc.returncode == 0 and rd.finished:
            self.mark(p, "done")
            self.progress.event(f"done {p.label} ({format_seconds(p.wall_s)}): {result_line(rd)}")
        else:
            self.mark(p, "failed")
            p.reason = f"exit code {proc.returncode}: {last_error(p.path / LOG)} (log: {p.path / LOG})"
            self.progress.event(f"FAILED {p.label}: {p.reason}")

    def loop(self) -> None:
        todo = [p for p in self.plans if p.status == "pending"]
        while todo or self.running:
            for p in list(todo):
                t = p.teacher
                if t is not None and t.status in ("failed", "skipped", "conflict", "busy"):
                    todo.remove(p)
                    why = f"is {t.reason}; run the sweep again when it has finished" if t.status == "busy" else \
                        f"{'was ' if t.status == 'skipped' else ''}{t.status}"
                    p.status, p.reason = "skipped", f"its teacher {t.label} {why}"
                    self.progress.event(f"skip {p.label}: {p.reason}")
            while len(self.running) < self.spec.jobs:
                ready = next((p for p in todo if p.teacher is None or p.teacher.status == "done"), None)
                if ready is None:
                    break
                todo.remove(ready)
                self.start(ready)
            for p, (proc, _, _) in list(self.running.items()):
                if proc.poll() is not None:
                    self.finish(p)
            self.progress.tick()
            time.sleep(0.2)

    def interrupt(self) -> None:
        """Stop the running runs (each keeps its last epoch's checkpoint) and mark them interrupted.

        A terminal's Ctrl-C reached them already; otherwise they get SIGINT, then SIGTERM.
        """
        for p, (proc, log, _) in list(self.running.items()):
            stop(proc)
            log.close()
            self.mark(p, "done" if proc.returncode == 0 and RunDir(p.path).finished else "interrupted")
        self.running.clear()


def stop(proc: subprocess.Popen) -> None:
    """Give ``proc`` 2 s to end, then SIGINT (10 s), SIGTERM (5 s), then kill it."""
    steps = [(lambda: None, 2.0), (lambda: proc.send_signal(signal.SIGINT), 10.0), (proc.terminate, 5.0), (proc.kill, None)]
    for act, wait in steps:
        act()
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def run_sweep(spec: SweepSpec, dry_run: bool = False, stream=None) -> SweepSummary:
    """Run every (row, seed) of ``spec`` (see the module docstring) and return what happened.

    ``dry_run`` prints the plan (run / resume / skip / conflict per run) and writes nothing.
    A spec whose ``launcher.name`` is ``slurm`` goes to :func:`fairdistill.sweeps.slurm.submit_sweep`.
    """
    stream = stream or sys.stderr
    if spec.launcher.name == "slurm":
        from .slurm import submit_sweep

        return submit_sweep(spec, dry_run=dry_run, stream=stream)
    claim_folder(spec, write=False)
    if dry_run:
        plans = plan_sweep(spec)
        stream.write(describe_plan(plans) + "\n")
        return SweepSummary(len(plans), dict(Counter(p.action for p in plans)), [], 0.0)
    with FolderLock(spec.out):
        return _run(spec, plan_sweep(spec), stream)


def await_orphans(spec: SweepSpec, plans: list[RunPlan], stream, timeout: float = 30.0) -> None:
    """Wait (up to ``timeout`` s) for the runs of a killed local sweep of this folder to stop.

    They die with their sweep (:mod:`.child`), but take a moment to; the caller holds the
    folder's lock, so no live sweep owns them.
    """
    orphans = []
    for p in plans:
        m = read_marker(p.path) or {}
        pid, sweep_pid = m.get("pid"), m.get("sweep_pid")
        if (m.get("status") == "running" and isinstance(pid, int) and isinstance(sweep_pid, int)
                and m.get("host") == this_host() and not process_alive(sweep_pid) and process_alive(pid)):
            orphans.append(pid)
    if not orphans:
        return
    stream.write(f"waiting for {len(orphans)} run(s) of a sweep that was killed to stop (process "
                 f"{', '.join(map(str, orphans))})\n")
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.1)


def _run(spec: SweepSpec, plans: list[RunPlan], stream) -> SweepSummary:
    claim_folder(spec, write=True)
    await_orphans(spec, plans, stream)
    states = plan_states(spec, plans)
    for p in plans:
        p.status = {"skip": "done", "conflict": "conflict"}.get(p.action, "pending")
        if p.action == "conflict":
            stream.write(f"not touched: {p.label}: {p.reason}\n")
        elif p.status == "pending" and states[p].busy:
            p.status, p.reason = "busy", states[p].describe()
    listing = describe_states(plans, states, everything=False)
    if listing:
        stream.write(listing + "\n")
    sweep = _Sweep(spec, plans, stream)
    reused = sum(p.action == "skip" for p in plans)
    stream.write(f"sweep {spec.name}: {len(plans)} runs ({reused} already finished) in {spec.out}, "
                 f"{spec.jobs} at a time, {sweep.threads} thread(s) each\n")
    summary = drive(sweep, spec, plans, {"jobs": spec.jobs, "threads_per_run": sweep.threads, "cpus": cpu_count(),
                                         "runs": len(plans), "reused": reused})
    counts, problems = summary.counts, summary.problems
    stream.write(f"sweep {spec.name}: {counts.get('done', 0)}/{len(plans)} done in {format_seconds(summary.wall_s)}"
                 + "".join(f"\n  {line}" for line in problems) + "\n")
    return summary
