"""The state of every run of a sweep, from its run folder and the scheduler, for any launcher.

    done        result.json is there
    running     a live process writes the folder (this machine), or its job runs
    queued      its job waits in the scheduler (for resources, or for its teacher's job)
    failed      its last attempt failed (the log's tail tells why) or its job ended without a result
    unfinished  it was stopped (killed, interrupted) after it started: it resumes
    not run     nothing of it is there
    foreign     the folder holds another sweep's run, or a run no sweep made

A sweep starts or submits only what is neither done, running nor queued, so one run folder never
gets a second writer from a sweep. Each run folder's ``sweep.json`` records its status as the
local runner or the run's job last wrote it (``queued``, ``running``, ``requeued``, ``done``,
``failed``, ``interrupted``), with the writer's process id and host.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RunDirError
from ..rundir import RunDir
from .jobs import QUEUED, RUNNING, JobStore, process_alive, scheduler_states, this_host
from .plan import owned, owner_of, read_marker
from .spec import LOG, SPEC_COPY, RowSpec, SweepSpec, load_spec, run_path

BUSY = ("running", "queued")


@dataclass
class RunState:
    """What a run folder holds now: ``state`` (see the module docstring), a ``detail`` for
    people, the run's ``job`` id (None when none was submitted) and, for a failed run, the
    ``tail`` of its log."""

    state: str
    detail: str = ""
    job: str | None = None
    tail: list = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return self.state in BUSY

    def describe(self) -> str:
        """``state (detail)`` as the report and the state listing print it."""
        return f"{self.state} ({self.detail})" if self.detail else self.state


def log_tail(path: Path, lines: int = 5) -> list[str]:
    """The last non-empty ``lines`` lines of a run's log (``train.log``), each cut at 300 characters."""
    try:
        text = (Path(path) / LOG).read_text(errors="replace")
    except OSError:
        return []
    kept = [ln.rstrip()[:300] for ln in text.splitlines() if ln.strip()]
    return kept[-lines:]


def live_writer(path: Path, marker: dict) -> str | None:
    """Who writes the run folder now: the holder of its writer's lock (``RunDir.writer``), or
    the process that ``sweep.json`` names while it still runs here (a run's process takes the
    lock only once it has started up); None when nobody does."""
    holder = RunDir(path).writer()
    if holder is not None:
        return str(holder)
    pid = marker.get("pid")
    if isinstance(pid, int) and marker.get("host") == this_host() and process_alive(pid, ("fairdistill", "submitit")):
        return f"process {pid}"
    return None


def epochs_done(path: Path) -> int:
    try:
        with open(Path(path) / "metrics.jsonl", "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def run_state(path: Path, owner: dict, job: dict | None = None, job_state: str | None = None) -> RunState:
    """The state of the run folder ``path`` of ``owner`` (sweep, row, seed); ``job`` is its
    ``jobs.json`` entry and ``job_state`` what the scheduler said of that job (None: not asked
    or no answer)."""
    path = Path(path)
    marker = read_marker(path)
    if not owned(marker, owner):
        return RunState("not run") if marker is None and not path.exists() else RunState("foreign", "not this sweep's run")
    rd = RunDir(path)
    jid = job["job"] if job else None
    on_job = f"job {jid}" if jid else ""
    if rd.finished:
        return RunState("done", job=jid)
    status = marker.get("status")
    writer = live_writer(path, marker)
    if writer is not None:
        return RunState("running", ", ".join(filter(None, [on_job, writer])), jid)
    if jid is not None:
        if job_state in RUNNING:
            return RunState("running", on_job, jid)
        if job_state in QUEUED:
            return RunState("queued", f"{on_job}, {job_state.lower()}", jid)
        if job_state is None and status in ("queued", "running", "requeued"):
            state = "queued" if status in ("queued", "requeued") else "running"
            return RunState(state, f"{on_job}, as last recorded: the scheduler did not answer", jid)
        if job_state is not None and status != "failed" and job_state not in ("COMPLETED", "ENDED") \
                and status in ("queued", "running", "requeued"):
            return RunState("failed", f"{on_job} ended {job_state} without a result", jid, log_tail(path))
    if status == "failed":
        return RunState("failed", on_job, jid, log_tail(path))
    if rd.started:
        n = epochs_done(path)
        return RunState("unfinished", f"stopped after epoch {n}" if n else "stopped before its first epoch ended", jid)
    return RunState("not run", job=jid)


def run_key(path: Path, folder: str | Path) -> str:
    """A run's name in ``jobs.json``: its folder relative to the sweep folder (``hkd/seed0``)."""
    return Path(path).relative_to(Path(folder)).as_posix()


def folder_states(folder: str | Path, runs: list[tuple[Path, dict]]) -> list[RunState]:
    """The state of each ``(run folder, owner)`` of sweep folder ``folder``, asking the
    scheduler once for every job that ``jobs.json`` records for them."""
    store = JobStore(folder)
    entries = [store.get(run_key(path, folder)) for path, _ in runs]
    asked = scheduler_states([e for e in entries if e])
    return [run_state(path, owner, e, asked.get(e["job"]) if e else None) for (path, owner), e in zip(runs, entries)]


def plan_states(spec, plans: list) -> dict:
    """:func:`folder_states` of a sweep's :class:`~fairdistill.sweeps.plan.RunPlan` list, by plan."""
    runs = [(p.path, owner_of(spec, p.row, p.seed)) for p in plans]
    return dict(zip(plans, folder_states(spec.out, runs)))


def describe_states(plans: list, states: dict, everything: bool = True) -> str:
    """One line per run (``everything``) or per run that is neither done nor new: its state,
    label, detail and folder; a failed run's log tail below it."""
    lines = []
    for p in plans:
        st = states[p]
        if not everything and st.state in ("done", "not run", "foreign"):
            continue
        detail = f" ({st.detail})" if st.detail else ""
        lines.append(f"{st.state:>10}  {p.label:<28} {p.path}{detail}")
        lines += [f"{'':>12}| {ln}" for ln in st.tail]
    if everything:
        counts = Counter(st.state for st in states.values())
        lines.append(f"{len(plans)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


@dataclass
class RowResults:
    """A table row of a sweep folder: the results of its finished runs, and what happened to the
    others (``missing``: "seed 2 failed", "seed 3 queued (job 812, pending)", ...; ``busy``: how
    many of them are still queued or running)."""

    row: RowSpec
    results: list
    missing: list
    busy: int = 0


def collect(folder: str | Path) -> tuple[SweepSpec, list[RowResults]]:
    """The saved spec of sweep folder ``folder`` and the runs of each table row, each unfinished
    run with its state (:mod:`.state`: the scheduler is asked about the jobs of ``jobs.json``)."""
    folder = Path(folder)
    f = folder / SPEC_COPY
    if not f.is_file():
        raise RunDirError(f"{folder}: no {SPEC_COPY}, so not a sweep folder; run `fairdistill sweep SPEC` first")
    spec = load_spec(f, check_configs=False)
    rows = [row for row in spec.rows if row.table]
    runs = [(run_path(folder, row, s), owner_of(spec, row, s)) for row in rows for s in row.seeds]
    states = iter(folder_states(folder, runs))
    entries = []
    for row in rows:
        results, missing, busy = [], [], 0
        for s in row.seeds:
            st = next(states)
            if st.state == "done":
                try:
                    results.append(RunDir(run_path(folder, row, s)).read_result())
                except RunDirError as e:
                    missing.append(f"seed {s} damaged ({e})")
            else:
                missing.append(f"seed {s} {st.detail if st.state == 'foreign' else st.describe()}")
                busy += st.busy
        entries.append(RowResults(row, results, missing, busy))
    return spec, entries
