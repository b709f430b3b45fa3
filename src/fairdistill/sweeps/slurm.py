"""Sweeps on a cluster: one SLURM job per run through submitit (``pip install 'fairdistill[slurm]'``).

Submission: every run that is neither done, running nor queued (:mod:`.state`) becomes one job,
in dependency order (teachers first). A student's job waits for its teacher's job with
``--dependency=afterok:ID`` (and ``--kill-on-invalid-dep=yes``: a failed teacher cancels its
students' jobs). ``max_parallel: K`` caps the runs at once with SLURM's ``singleton``
dependency, the equivalent of a job array's ``%K`` for jobs with dependencies of their own: the
jobs are dealt round-robin over K job names (``fd-<sweep>-<slot>``) and SLURM runs one job of a
name at a time. ``sweep`` returns once the jobs are submitted (``wait: true`` watches them to
the end); the job ids are kept in the sweep folder (``jobs.json``), submitit's scripts and logs
under ``<sweep>/slurm/<job id>/``. With ``cluster: local`` (submitit's local executor: no
scheduler) the sweep submits a student's job once its teacher finished, at most K (default:
the spec's ``jobs``) at once, and waits for the end.

A job (:class:`TrainJob`) trains its run in its own process (``engine.train``), output appended
to the run's ``train.log``, resuming when the folder holds a started run. With N GPUs the job
has N tasks, and each joins PyTorch DDP from the job's environment (rank, world size, master
address and port), the variables torchrun would set. A job that is preempted or reaches its time
limit gets SIGUSR2 from SLURM (``--signal``); submitit then calls :meth:`TrainJob.checkpoint`,
which records it and hands back the job to requeue: it resumes from the run's last epoch
checkpoint (the epoch in progress is lost).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from ..errors import ConfigError, FairdistillError, RunDirError
from ..progress import format_seconds
from ..rundir import RunDir, write_json
from .jobs import QUEUED, RUNNING, JobStore, local_states, this_host
from .launcher import time_minutes
from .plan import FolderLock, RunPlan, claim_folder, owner_of, plan_sweep, read_marker
from .session import SweepProgress, SweepSummary, child_env, cpu_count, drive, last_error, result_line
from .spec import LOG, MARKER, SweepSpec, slug
from .state import describe_states, log_tail, plan_states, run_key

EXTRA = "pip install 'fairdistill[slurm]'"


def import_submitit():
    """submitit, or a ConfigError naming the extra that installs it."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(f"launcher slurm runs the sweep's jobs through submitit, which is not installed: {EXTRA} "
                          "(the optional extra 'slurm'), or use --launcher local") from None
    return submitit


def _mark(path: Path, owner: dict, status: str, **extra) -> None:
    write_json(Path(path) / MARKER, {**owner, "status": status, "log": LOG, **extra})


class TrainJob:
    """One run as a submitit job: ``train`` the config ``config`` with overrides ``argv`` into
    ``path`` (relative paths from ``cwd``), resuming when the folder holds a started run.

    It writes the run's ``sweep.json`` (running with its job id, process and host, then done or
    failed; requeued from :meth:`checkpoint`) and appends its output to ``train.log``; an
    error ends the job with the error line in the log (the job fails, so students waiting with
    ``afterok`` are cancelled). Returns the run's final metrics.
    """

    def __init__(self, config: str, argv: list[str], path: str, owner: dict, cwd: str, resume: bool = False):
        self.config, self.argv, self.path, self.owner, self.cwd, self.resume = config, list(argv), path, owner, cwd, resume

    def __call__(self) -> dict:
        import submitit

        os.chdir(self.cwd)
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one DDP process per task, as torchrun would set them up
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        main = env.global_rank == 0
        rd = RunDir(self.path)
        if rd.finished:  # requeued after its result was written
            return rd.read_result()["final"]
        holder = rd.writer() if main else None
        if holder is not None:  # one writer per run folder: never a second one
            raise RunDirError(f"{rd.path} is being written by {holder}; this job leaves it to that process")
        resume = self.resume or rd.started  # every task decides before DDP joins, so all alike
        log = open(rd.path / LOG, "a", buffering=1) if main else None  # line by line: a killed job keeps its lines
        with contextlib.ExitStack() as stack:
            if log is not None:
                stack.enter_context(log)
                stack.enter_context(contextlib.redirect_stdout(log))
                stack.enter_context(contextlib.redirect_stderr(log))
                _mark(rd.path, self.owner, "running", job=str(env.job_id), pid=os.getpid(), host=this_host())
                print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} job {env.job_id} on {this_host()} ({env.num_tasks} "
                      f"task(s)): fairdistill train {self.config} {' '.join(self.argv)}{' --resume' if resume else ''}",
                      flush=True)
            try:
                from ..config import load_config
                from ..engine import train

                result = train(load_config(self.config, self.argv), resume=resume)
            except BaseException as e:
                if isinstance(e, FairdistillError):
                    print(f"fairdistill: error: {e}", flush=True)
                elif isinstance(e, Exception):
                    traceback.print_exc()
                if main and not isinstance(e, SystemExit):  # SystemExit: requeued by checkpoint()
                    _mark(rd.path, self.owner, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                          job=str(env.job_id))
                raise
            if main:
                print(f"finished {rd.path}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["final"].items()
                                                          if isinstance(v, float)), flush=True)
                _mark(rd.path, self.owner, "done", job=str(env.job_id))
        return result["final"]

    def checkpoint(self, *args, **kwargs):
        """submitit's hook on preemption or time limit (rank 0): record the requeue; the job runs
        again and resumes from the run's last epoch checkpoint."""
        from submitit.helpers import DelayedSubmission

        path = Path(self.path)
        with contextlib.suppress(OSError):
            with open(path / LOG, "a") as f:
                f.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} preempted or at its time limit: requeued; it resumes "
                        "from its last epoch's checkpoint\n")
            _mark(path, self.owner, "requeued")
        return DelayedSubmission(TrainJob(self.config, self.argv, self.path, self.owner, self.cwd, resume=True))


def job_threads(spec: SweepSpec, slots: int) -> int | None:
    """Threads per task for runs whose config leaves ``threads`` at 0: the job's CPUs over its
    tasks; without ``cpus_per_run``, this machine's cores over the runs at once with ``cluster:
    local`` and None (torch's default in the job) on SLURM."""
    L = spec.launcher
    if L.cpus_per_run is not None:
        return max(1, L.cpus_per_run // L.tasks)
    return max(1, cpu_count() // (slots * L.tasks)) if L.cluster == "local" else None


def job_folder(out: str | Path, cluster: str) -> Path:
    """submitit's folder of a sweep's jobs: ``<sweep>/slurm/<job id>/`` (SLURM), ``<sweep>/slurm/`` (local)."""
    folder = Path(out).resolve() / "slurm"
    return folder / "%j" if cluster == "slurm" else folder


def make_executor(spec: SweepSpec):
    """submitit's SlurmExecutor (or LocalExecutor for ``cluster: local``) with the launcher's
    resources; scripts and logs go to :func:`job_folder`."""
    submitit = import_submitit()
    L = spec.launcher
    folder = job_folder(spec.out, L.cluster)
    src = str(Path(__file__).resolve().parents[2])
    minutes = time_minutes(L.time)
    if L.cluster == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=L.max_requeues)
        ex.update_parameters(timeout_min=minutes, tasks_per_node=L.tasks, gpus_per_node=L.gpus_per_run)
        return ex
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"launcher slurm: {' and '.join(missing)} not found on PATH, so this is no SLURM login node; "
                          "submit from one, or run the jobs on this machine with --cluster local (launcher.cluster: local)")
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=L.max_requeues)
    params = {"time": minutes, "nodes": 1, "ntasks_per_node": L.tasks, "gpus_per_node": L.gpus_per_run or None,
              "cpus_per_task": (L.cpus_per_run // L.tasks or 1) if L.cpus_per_run else None,
              "partition": L.partition, "account": L.account, "mem": L.mem,
              "setup": [f"export PYTHONPATH={src}${{PYTHONPATH:+:$PYTHONPATH}}"]}
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


class _Handle:
    """A run's job: submitted now (``job``, submitit's object) or found in ``jobs.json``."""

    def __init__(self, job_id: str, cluster: str, job=None, folder: Path | None = None):
        self.id, self.cluster, self.job = str(job_id), cluster, job
        if job is None and cluster == "slurm":
            import submitit

            self.job = submitit.SlurmJob(folder=job_folder(folder, "slurm"), job_id=self.id)

    def state(self) -> str:
        if self.job is None:  # a local job of an earlier sweep: its controller process
            return local_states([self.id])[self.id]
        state = str(self.job.state).split()[0].upper()
        if self.cluster == "local":
            return "RUNNING" if state == "RUNNING" else "ENDED"
        return state

    def ended(self) -> bool:
        if self.cluster == "slurm" and self.job is not None:
            return self.job.done()
        return self.state() not in QUEUED | RUNNING

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel(check=False)


class SubmititSweep:
    """Submission (and, when waiting, the watch loop) of :func:`submit_sweep`."""

    def __init__(self, spec: SweepSpec, plans: list[RunPlan], stream):
        self.spec, self.plans, self.stream = spec, plans, stream
        L = spec.launcher
        self.native = L.cluster == "slurm"  # the scheduler holds dependencies and the cap
        self.wait = L.wait or not self.native
        self.cap = L.max_parallel if (L.max_parallel or self.native) else spec.jobs
        self.threads = job_threads(spec, self.cap or 1)
        self.store = JobStore(spec.out)
        self.executor = make_executor(spec)
        self.handles: dict[RunPlan, _Handle] = {}
        self.progress = SweepProgress(plans, stream)
        self.slot = {p: i for i, p in enumerate(plans)}

    # -- submission --------------------------------------------------------------

    def dependency(self, p: RunPlan) -> str | None:
        parts = []
        t = p.teacher
        if t is not None and t.status in ("queued", "running") and t in self.handles:
            parts.append(f"afterok:{self.handles[t].id}")
        if self.native and self.cap:
            parts.append("singleton")
        return ",".join(parts) or None

    def submit(self, p: RunPlan) -> None:
        owner = owner_of(self.spec, p.row, p.seed)
        argv = list(p.argv) + ([f"threads={self.threads}"] if p.cfg.threads == 0 and self.threads else [])
        job = TrainJob(p.row.config, argv, str(p.path), owner, os.getcwd(), resume=p.action == "resume")
        p.path.mkdir(parents=True, exist_ok=True)
        _mark(p.path, owner, "queued")
        dep = self.dependency(p)
        if self.native:
            name = f"fd-{slug(self.spec.name)}" + (f"-{self.slot[p] % self.cap}" if self.cap else "")
            self.executor.update_parameters(job_name=name, dependency=dep,
                                            additional_parameters={"kill_on_invalid_dep": "yes"} if dep else {})
        try:
            with _environ(PYTHONPATH=child_env()["PYTHONPATH"]):
                submitted = self.executor.submit(job)
        except Exception as e:  # sbatch refused it (a partition, account or limit): say so, go on
            p.status, p.reason = "failed", f"not submitted: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
            self.progress.event(f"FAILED {p.label}: {p.reason}")
            return
        self.handles[p] = _Handle(submitted.job_id, self.spec.launcher.cluster, submitted)
        self.store.record(run_key(p.path, self.spec.out), submitted.job_id, self.spec.launcher.cluster)
        p.status = "queued"
        after = f", after job {self.handles[p.teacher].id}" if dep and "afterok" in dep else ""
        self.progress.event(f"submitted {p.label} as job {submitted.job_id}{' (resumes)' if p.action == 'resume' else ''}{after}")

    def ready(self, p: RunPlan) -> bool:
        t = p.teacher
        return t is None or t.status == "done" or (self.native and t.status in ("queued", "running") and t in self.handles)

    def blocked(self, p: RunPlan) -> str:
        """Why pending ``p`` can never start in this call ("" when it can)."""
        t = p.teacher
        if t is None:
            return ""
        if t.status in ("failed", "skipped", "conflict"):
            return f"its teacher {t.label} {'was ' if t.status == 'skipped' else ''}{t.status}"
        if t.status in ("queued", "running") and t not in self.handles:
            return f"its teacher {t.label} is {t.status} ({t.reason}); run the sweep again when it has finished"
        return ""

    # -- the loop ----------------------------------------------------------------

    def active(self) -> list[RunPlan]:
        return [p for p in self.plans if p.status in ("queued", "running") and p in self.handles]

    def finish(self, p: RunPlan, state: str) -> None:
        rd = RunDir(p.path)
        self.progress.ended_now += 1
        if rd.finished:
            p.status = "done"
            self.progress.event(f"done {p.label} (job {self.handles[p].id}): {result_line(rd)}")
            return
        t = p.teacher
        if t is not None and t.status in ("failed", "skipped"):
            p.status, p.reason = "skipped", f"its teacher {t.label} {t.status}"
            self.progress.event(f"skip {p.label}: {p.reason}")
            return
        p.status = "failed"
        p.reason = f"job {self.handles[p].id} {state}: {last_error(p.path / LOG)} (log: {p.path / LOG})"
        marker = read_marker(p.path) or {}
        if marker.get("status") in ("queued", "running", "requeued"):  # the job could not say so itself
            _mark(p.path, owner_of(self.spec, p.row, p.seed), "failed", job=self.handles[p].id)
        self.progress.event(f"FAILED {p.label}: {p.reason}" + "".join(f"\n{'':>12}| {ln}" for ln in log_tail(p.path)))

    def loop(self) -> None:
        poll = 0.2 if not self.native else 5.0
        while True:
            for p in self.plans:
                why = self.blocked(p) if p.status == "pending" else ""
                if why:
                    p.status, p.reason = "skipped", why
                    self.progress.event(f"skip {p.label}: {p.reason}")
            for p in self.plans:
                if p.status == "pending" and self.ready(p) and (self.native or len(self.active()) < self.cap):
                    self.submit(p)
            if not self.wait:
                return
            active = self.active()
            pending = [p for p in self.plans if p.status == "pending"]
            if not active:
                for p in pending:  # nothing runs that they could wait for (not expected: a safety net)
                    t = p.teacher
                    p.status, p.reason = "skipped", f"its teacher {t.label} is {t.status}" if t else "it could not start"
                    self.progress.event(f"skip {p.label}: {p.reason}")
                return
            for p in active:
                h = self.handles[p]
                if h.ended():
                    self.finish(p, h.state())
                elif p.status == "queued" and h.state() in RUNNING:
                    p.status = "running"
            self.progress.tick()
            time.sleep(poll)

    def interrupt(self) -> None:
        """Local jobs stop with the sweep (each keeps its last checkpoint); SLURM jobs go on."""
        if self.native:
            self.stream.write("stopped watching; the jobs stay with SLURM: run the same command to see their state "
                              "(scancel stops them)\n")
            return
        for p in self.active():
            self.handles[p].cancel()
        deadline = time.monotonic() + 15
        while any(not self.handles[p].ended() for p in self.active()) and time.monotonic() < deadline:
            time.sleep(0.1)


@contextlib.contextmanager
def _environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def submit_sweep(spec: SweepSpec, dry_run: bool = False, stream=None) -> SweepSummary:
    """Show the state of every run of ``spec`` and submit, as one job each, those neither done,
    running nor queued (see the module docstring); ``dry_run`` submits nothing (and needs no submitit)."""
    stream = stream or sys.stderr
    if not dry_run:
        import_submitit()
    claim_folder(spec, write=False)
    plans = plan_sweep(spec)
    if dry_run:
        states = plan_states(spec, plans)
        stream.write(describe_states(plans, states) + "\n")
        todo = [p for p in plans if p.action in ("run", "resume") and not states[p].busy]
        shown = ", ".join(p.label for p in todo[:8]) + (f" and {len(todo) - 8} more" if len(todo) > 8 else "")
        stream.write(f"would submit {len(todo)} job(s){': ' + shown if todo else ''}\n")
        return SweepSummary(len(plans), dict(Counter(s.state for s in states.values())), [], 0.0)
    with FolderLock(spec.out):
        return _submit(spec, plans, stream)


def _submit(spec: SweepSpec, plans: list[RunPlan], stream) -> SweepSummary:
    claim_folder(spec, write=True)
    sweep = SubmititSweep(spec, plans, stream)
    states = plan_states(spec, plans)
    for p in plans:
        st = states[p]
        p.status = {"skip": "done", "conflict": "conflict"}.get(p.action, "pending")
        if p.status == "pending" and st.busy:
            p.status, p.reason = st.state, st.detail
            if st.job is not None:
                sweep.handles[p] = _Handle(st.job, (sweep.store.get(run_key(p.path, spec.out)) or {}).get("cluster", "local"),
                                           folder=Path(spec.out))
        if p.action == "conflict":
            p.reason = st.detail if st.state == "foreign" else p.reason
    L = spec.launcher
    where = "SLURM jobs" if sweep.native else "jobs of submitit's local executor on this machine"
    stream.write(f"sweep {spec.name}: {len(plans)} runs in {spec.out} as {where}, "
                 f"{f'at most {sweep.cap} at once' if sweep.cap else 'as many at once as the cluster gives'}; "
                 f"{L.tasks} task(s) each" + (f", {sweep.threads} thread(s) per task" if sweep.threads else "") + "\n")
    stream.write(describe_states(plans, states) + "\n")
    summary = drive(sweep, spec, plans, {
        "launcher": "slurm", "cluster": L.cluster, "waited": sweep.wait, "jobs": sweep.cap or len(plans),
        "threads_per_run": sweep.threads, "cpus": L.cpus_per_run or cpu_count(), "runs": len(plans),
        "reused": sum(p.action == "skip" for p in plans)})
    counts, problems = summary.counts, summary.problems
    busy = counts.get("queued", 0) + counts.get("running", 0)
    stream.write(f"sweep {spec.name}: {counts.get('done', 0)}/{len(plans)} done, {busy} queued or running"
                 + (f" ({format_seconds(summary.wall_s)})" if sweep.wait else "")
                 + "".join(f"\n  {line}" for line in problems) + "\n")
    if busy:
        stream.write("state: run the same `fairdistill sweep` command again (it submits nothing twice)\n")
    return summary
