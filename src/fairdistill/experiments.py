"""Sweeps over configs x seeds, and the papers' result tables.

A *spec* (YAML, read safely) names a grid: rows (a config file, overrides, optionally the row
whose runs are its teacher) times seeds. :func:`run_sweep` trains every (row, seed) in its own
``python -m fairdistill train`` process, at most ``jobs`` at once, teachers before the rows that
need them. It skips finished runs, resumes killed ones, and never touches a run directory that
holds another sweep's run (or a run no sweep made): each run directory it owns carries a
``sweep.json`` marker (sweep name, row, seed, status).

:func:`write_report` aggregates a sweep folder into the papers' layouts:

- ``mfd``: accuracy, DEO_A and DEO_M of the final epoch, x100, mean ± standard deviation over
  the seeds (MFD supplement Tables 2-4; the paper does not say which standard deviation, the
  report uses the sample one, ddof = 1);
- ``ofd``: error rate = 100 - accuracy of the final epoch, median over the runs (OFD, official
  code's README and its issue #9), optionally pivoted with one column per setting (OFD Table 2,
  supplement Tables 1-2).

Paths in a spec (config files, ``out``) are relative to the current directory, as on the command
line.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import yaml

from .config import RunConfig, check_choice, from_dict, load_config, parse_override, safe_load, stage_list, to_dict
from .errors import ConfigError, FairdistillError, RunDirError
from .progress import format_seconds
from .registry import check_kwargs, suggest
from .rundir import RunDir, write_json, write_text

LAYOUTS = {"mfd": ("accuracy", "deo_a", "deo_m"), "ofd": ("error",)}
"""Table layout -> the metrics of its paper columns."""
MARKER = "sweep.json"  #: ownership marker in each run directory of a sweep
LOG = "train.log"  #: each run's captured output, next to its files
SPEC_COPY = "spec.yaml"  #: the effective spec, saved in the sweep folder when it starts
STATUS = "sweep_status.json"  #: the last sweep invocation's counts and wall time
LOCK = "sweep.lock"  #: held (with the process id) while a sweep runs in the folder


# ----------------------------------------------------------------------------- spec


@dataclass
class RowSpec:
    """One table row: a config run over the seeds.

    ``teacher`` names the row whose runs are this row's teacher (``teacher.run`` is set to that
    row's run of the same seed, or of ``teacher_seed``). ``seeds`` overrides the spec's seeds
    (e.g. ``[0]`` for a teacher trained once). ``table: false`` hides the row from the report.
    ``paper`` holds the paper's values: ``accuracy``/``deo_a``/``deo_m`` as ``[mean, std]`` (mfd
    layout) or ``error`` (ofd layout). ``label``/``column`` place the row in the report (ofd:
    a ``column`` pivots the table); ``dir`` is its folder in the sweep (default: the name, slugged).
    """

    name: str = ""
    config: str = ""
    overrides: list = field(default_factory=list)
    teacher: Union[str, None] = None
    teacher_seed: Union[int, None] = None
    seeds: Union[list, None] = None
    table: bool = True
    paper: dict = field(default_factory=dict)
    label: str = ""
    column: Union[str, None] = None
    dir: str = ""


@dataclass
class SweepSpec:
    """A grid of rows x seeds, and how to report it (see the module docstring).

    ``teacher_seed``: None gives every student the teacher run of its own seed; an integer gives
    every student that seed's teacher run (the official MFD README used the seed-0 teacher).
    ``overrides`` apply to every run, before each row's own.
    """

    name: str = ""
    title: str = ""
    layout: str = "mfd"
    out: str = ""
    seeds: list = field(default_factory=lambda: [0])
    jobs: int = 1
    overrides: list = field(default_factory=list)
    teacher_seed: Union[int, None] = None
    paper_source: str = ""
    rows: list = field(default_factory=list)

    def row(self, name: str) -> RowSpec:
        return next(r for r in self.rows if r.name == name)


def slug(name: str) -> str:
    """A folder name for a row name: lower case, runs of other characters as ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def load_spec(path: str | Path, overrides: list[str] = (), out: str | None = None, jobs: int | None = None,
              check_configs: bool = True) -> SweepSpec:
    """Read and validate a spec; ``overrides``, ``out`` and ``jobs`` come from the command line.

    With ``check_configs`` every row's config is loaded with its overrides (unknown file, key or
    name fail here, naming the row), so a bad spec fails before anything runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"spec file {path} does not exist")
    try:
        data = safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a spec must be a mapping (name, seeds, rows, ...), got {type(data).__name__}")
    try:
        spec = from_dict(SweepSpec, data)
        rows = []
        for i, r in enumerate(spec.rows):
            try:
                rows.append(from_dict(RowSpec, r, f"rows[{i}]"))
            except ConfigError as e:
                name = r.get("name") if isinstance(r, dict) else None
                raise ConfigError(f"row {name!r}: {e}" if name else str(e)) from None
        spec.rows = rows
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    spec.name = spec.name or path.stem
    spec.out = out or spec.out or f"runs/sweeps/{spec.name}"
    spec.jobs = spec.jobs if jobs is None else jobs
    spec.overrides = [*spec.overrides, *overrides]
    check_spec(spec, str(path))
    if check_configs:
        check_row_configs(spec, str(path))
    return spec


def _check_seeds(seeds, key: str) -> None:
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"{key}: expected a non-empty list of seeds, e.g. [0, 1, 2, 3]")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{key}: seeds are integers >= 0, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{key}: a seed is listed twice ({seeds})")


def _check_overrides(overrides: list, key: str) -> None:
    for o in overrides:
        if not isinstance(o, str):
            raise ConfigError(f"{key}: expected 'key=value' strings, got {o!r}")
        name = parse_override(o)[0][0]
        if name in ("seed", "out"):
            where = "the spec's seeds (or a row's seeds)" if name == "seed" else "the spec's out (or --out)"
            raise ConfigError(f"{key}: {o!r}: the sweep sets {name} of every run; use {where}")


def check_spec(spec: SweepSpec, where: str = "spec") -> None:
    """Structural checks (no config file is read); fills each row's ``seeds``, ``dir``, ``label``."""
    try:
        check_choice("layout", spec.layout, tuple(LAYOUTS))
        _check_seeds(spec.seeds, "seeds")
        if spec.jobs < 1:
            raise ConfigError(f"jobs: must be >= 1, got {spec.jobs}")
        _check_overrides(spec.overrides, "overrides")
        if not spec.rows:
            raise ConfigError("rows: a spec needs at least one row ({name, config})")
        names: dict[str, int] = {}
        dirs: dict[str, str] = {}
        for i, row in enumerate(spec.rows):
            key = f"rows[{i}]"
            if not row.name:
                raise ConfigError(f"{key}.name: every row needs a name")
            if not row.config:
                raise ConfigError(f"{key} ({row.name}).config: every row needs a config file")
            if row.name in names:
                raise ConfigError(f"{key}.name: {row.name!r} is also the name of rows[{names[row.name]}]")
            names[row.name] = i
            row.dir = row.dir or slug(row.name)
            if not row.dir or row.dir in dirs:
                why = "has no letter or digit" if not row.dir else f"gives folder {row.dir!r}, as row {dirs[row.dir]!r}"
                raise ConfigError(f"{key}.name: {row.name!r} {why}; set {key}.dir")
            dirs[row.dir] = row.name
            row.label = row.label or row.name
            row.seeds = list(spec.seeds) if row.seeds is None else row.seeds
            _check_seeds(row.seeds, f"{key} ({row.name}).seeds")
            _check_overrides(row.overrides, f"{key} ({row.name}).overrides")
            _check_paper(row, spec.layout, f"{key} ({row.name}).paper")
            if row.column is not None and spec.layout != "ofd":
                raise ConfigError(f"{key} ({row.name}).column: only the ofd layout has columns per row")
        for i, row in enumerate(spec.rows):
            if row.teacher is not None:
                _check_teacher(spec, i, row)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_paper(row: RowSpec, layout: str, key: str) -> None:
    for metric, value in row.paper.items():
        if metric not in LAYOUTS[layout]:
            raise ConfigError(f"{key}.{metric}: not a column of the {layout} layout.{suggest(metric, LAYOUTS[layout])} "
                              f"Valid: {', '.join(LAYOUTS[layout])}.")
        parts = value if isinstance(value, list) else [value]
        if not 1 <= len(parts) <= 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in parts):
            raise ConfigError(f"{key}.{metric}: expected a number or [mean, std], got {value!r}")


def teacher_seed(spec: SweepSpec, row: RowSpec, seed: int) -> int:
    """The seed of the teacher run that the run ``(row, seed)`` distils from."""
    fixed = row.teacher_seed if row.teacher_seed is not None else spec.teacher_seed
    return seed if fixed is None else fixed


def _check_teacher(spec: SweepSpec, i: int, row: RowSpec) -> None:
    key = f"rows[{i}] ({row.name}).teacher"
    names = [r.name for r in spec.rows]
    if row.teacher not in names or row.teacher == row.name:
        others = [n for n in names if n != row.name]
        raise ConfigError(f"{key}: no other row is named {row.teacher!r}.{suggest(row.teacher, others)} Rows: {', '.join(others)}.")
    seen = [row.name]
    t = spec.row(row.teacher)
    while t.teacher is not None:
        if t.name in seen:
            raise ConfigError(f"{key}: teachers form a cycle ({' -> '.join([*seen, t.name])})")
        seen.append(t.name)
        t = spec.row(t.teacher)
    t = spec.row(row.teacher)
    for s in row.seeds:
        ts = teacher_seed(spec, row, s)
        if ts not in t.seeds:
            raise ConfigError(f"{key}: seed {s} needs the teacher run of seed {ts}, but row {t.name!r} runs seeds "
                              f"{t.seeds}; set teacher_seed or the teacher row's seeds")


def depth(spec: SweepSpec, row: RowSpec) -> int:
    """0 for a row without a teacher, else 1 + its teacher row's depth."""
    return 0 if row.teacher is None else 1 + depth(spec, spec.row(row.teacher))


def run_path(out: str | Path, row: RowSpec, seed: int) -> Path:
    return Path(out) / row.dir / f"seed{seed}"


def run_overrides(spec: SweepSpec, row: RowSpec, seed: int) -> list[str]:
    """The ``key=value`` overrides of run ``(row, seed)``: the spec's, the row's, then seed,
    out and (when the row has a teacher row) ``teacher.run``."""
    argv = [*spec.overrides, *row.overrides, f"seed={seed}", f"out={run_path(spec.out, row, seed)}"]
    if row.teacher is not None:
        argv.append(f"teacher.run={run_path(spec.out, spec.row(row.teacher), teacher_seed(spec, row, seed))}")
    return argv


def needs_teacher(cfg: RunConfig) -> bool:
    from .methods import TERMS

    return any(TERMS.get(spec.get("type", name)).needs_teacher for name, spec in cfg.terms.items())


def check_config(cfg: RunConfig) -> None:
    """Checks beyond ``load_config`` that need no data: model, data-set and term options, stages."""
    from .data import DATASETS
    from .methods.objective import build_terms
    from .models import MODELS

    check_kwargs(MODELS.get(cfg.model.name, key="model.name"), cfg.model.options, "model.options")
    check_kwargs(DATASETS.get(cfg.data.name, key="data.name"), cfg.data.options, "data.options")
    build_terms(cfg.terms)
    stage_list(cfg)


def check_row_configs(spec: SweepSpec, where: str = "spec") -> None:
    """Load every row's config with its overrides (first seed); fail naming the row and key."""
    for i, row in enumerate(spec.rows):
        try:
            cfg = load_config(row.config, run_overrides(spec, row, row.seeds[0]))
            check_config(cfg)
            if row.teacher is None and needs_teacher(cfg):
                t = cfg.teacher
                if t.run and not RunDir(t.run).finished:
                    raise ConfigError(f"teacher.run: {t.run} is not a finished run; train it first, or name the row "
                                      "that trains it (teacher: ROW)")
                if not t.run and not t.checkpoint:
                    raise ConfigError("this config needs a teacher: name the row that trains it (teacher: ROW)")
        except ConfigError as e:
            raise ConfigError(f"{where}: row {row.name!r} (rows[{i}], {row.config}): {e}") from None


def spec_yaml(spec: SweepSpec) -> str:
    return yaml.safe_dump(asdict(spec), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- plan


@dataclass(eq=False)
class RunPlan:
    """One (row, seed) of a sweep: where it runs, with which overrides, and what to do with it.

    ``action``: run | resume | skip (finished) | conflict (the directory is not this sweep's);
    ``status`` while sweeping: pending | running | done | failed | skipped | conflict.
    """

    row: RowSpec
    seed: int
    path: Path
    argv: list
    cfg: RunConfig
    teacher: "RunPlan | None" = None
    action: str = "run"
    reason: str = ""
    status: str = "pending"
    wall_s: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.row.name} seed {self.seed}"


def owner_of(spec: SweepSpec, row: RowSpec, seed: int) -> dict:
    return {"sweep": spec.name, "row": row.name, "seed": seed}


def read_marker(path: Path) -> dict | None:
    """The run directory's ``sweep.json``; None when absent; {} when unreadable."""
    f = Path(path) / MARKER
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def owned(marker: dict | None, owner: dict) -> bool:
    return marker is not None and all(marker.get(k) == v for k, v in owner.items())


def config_changes(rd: RunDir, cfg: RunConfig) -> list[str]:
    """Top-level config keys in which ``rd``'s saved config differs from ``cfg`` (those that may
    differ on resume, and ``out``, are ignored)."""
    from .engine import RESUMABLE, read_run_config

    saved, now = to_dict(read_run_config(rd)), to_dict(cfg)
    return sorted(k for k in now if k not in (*RESUMABLE, "out") and saved.get(k) != now[k])


def claim_action(path: Path, owner: dict, cfg: RunConfig) -> tuple[str, str]:
    """What a sweep may do with run directory ``path``: (action, reason)."""
    rd = RunDir(path)
    marker = read_marker(path)
    if marker is not None and not owned(marker, owner):
        who = f"sweep {marker.get('sweep')!r}, row {marker.get('row')!r}, seed {marker.get('seed')}" if marker else "nobody"
        return "conflict", f"{path} belongs to {who} ({MARKER}); left untouched"
    if marker is None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        return "conflict", f"{path} holds files that no sweep wrote (no {MARKER}); left untouched"
    if rd.config.is_file():
        try:
            changed = config_changes(rd, cfg)
        except FairdistillError as e:
            return "conflict", f"{path}: its config.yaml cannot be read ({e}); left untouched"
        if changed:
            state = "finished" if rd.finished else "unfinished"
            return "conflict", f"{path} holds a {state} run of another config (changed: {', '.join(changed)}); remove it to re-run"
    if rd.finished:
        return "skip", "finished"
    if rd.started:
        return "resume", "unfinished"
    return "run", ""


def plan_sweep(spec: SweepSpec) -> list[RunPlan]:
    """Every (row, seed) with its action, in start order: teachers first, then by seed and row."""
    plans: dict[tuple[str, int], RunPlan] = {}
    order = sorted(range(len(spec.rows)), key=lambda i: depth(spec, spec.rows[i]))
    for i in order:
        row = spec.rows[i]
        for s in row.seeds:
            argv = run_overrides(spec, row, s)
            try:
                cfg = load_config(row.config, argv)
            except ConfigError as e:
                raise ConfigError(f"row {row.name!r}, seed {s}: {e}") from None
            path = run_path(spec.out, row, s)
            teacher = plans[(row.teacher, teacher_seed(spec, row, s))] if row.teacher is not None else None
            action, reason = claim_action(path, owner_of(spec, row, s), cfg)
            plans[(row.name, s)] = RunPlan(row, s, path, argv, cfg, teacher, action, reason)
    index = {r.name: i for i, r in enumerate(spec.rows)}
    return sorted(plans.values(), key=lambda p: (depth(spec, p.row), p.seed, index[p.row.name]))


# ----------------------------------------------------------------------------- run


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def child_env() -> dict:
    """The environment of a run's process: this fairdistill first on the import path."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent)
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
        return not any(self.counts.get(k) for k in ("failed", "skipped", "conflict"))


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
        remaining = c["pending"] + c["running"]
        eta = format_seconds(elapsed / self.ended_now * remaining) if self.ended_now else "?"
        return (f"[{c['done']}/{len(self.plans)} done, {c['failed']} failed, {c['skipped'] + c['conflict']} skipped, "
                f"{c['running']} running; {format_seconds(elapsed)} elapsed, ETA {eta}]")

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


def claim_folder(spec: SweepSpec, write: bool) -> None:
    """Refuse a sweep folder that holds another sweep's spec; save this spec there (``write``)."""
    f = Path(spec.out) / SPEC_COPY
    if f.is_file():
        try:
            other = (safe_load(f.read_text()) or {}).get("name")
        except (yaml.YAMLError, AttributeError):
            other = None
        if other != spec.name:
            raise RunDirError(f"{spec.out} holds sweep {other!r} ({SPEC_COPY}), not {spec.name!r}; choose another out "
                              "(--out DIR) or remove that folder")
    if write:
        write_text(f, f"# the spec of sweep {spec.name!r} as last run by `fairdistill sweep`\n" + spec_yaml(spec))


class FolderLock:
    """``LOCK`` in the sweep folder while a sweep runs there, so that the same sweep started
    twice cannot train one run in two processes. A lock whose process is gone is taken over."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)  # stale: its sweep was killed
                    continue
                except PermissionError:  # the process exists (another user's)
                    pass
                raise RunDirError(f"another sweep (process {pid}) is running in {self.path.parent}; "
                                  f"wait for it, or remove {self.path} if that process is not a sweep") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise RunDirError(f"{self.path}: cannot take the sweep lock")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def describe_plan(plans: list[RunPlan]) -> str:
    lines = []
    for p in plans:
        teacher = f"  teacher: {p.teacher.path}" if p.teacher else ""
        why = f" ({p.reason})" if p.reason and p.action != "skip" else ""
        lines.append(f"{p.action:>8}  {p.label:<28} {p.path}{teacher}{why}")
    c = Counter(p.action for p in plans)
    lines.append(f"{len(plans)} runs: " + ", ".join(f"{c[a]} {a}" for a in ("run", "resume", "skip", "conflict") if c[a]))
    return "\n".join(lines)


class _Sweep:
    """The scheduling loop of :func:`run_sweep`."""

    def __init__(self, spec: SweepSpec, plans: list[RunPlan], stream):
        self.spec, self.plans, self.stream = spec, plans, stream
        self.progress = SweepProgress(plans, stream)
        self.threads = max(1, cpu_count() // spec.jobs)
        self.running: dict[RunPlan, tuple[subprocess.Popen, object, float]] = {}

    def mark(self, p: RunPlan, status: str) -> None:
        p.status = status
        if status in ("running", "done", "failed", "interrupted"):
            write_json(p.path / MARKER, {**owner_of(self.spec, p.row, p.seed), "status": status, "log": LOG})

    def start(self, p: RunPlan) -> None:
        p.path.mkdir(parents=True, exist_ok=True)
        self.mark(p, "running")
        argv = list(p.argv) + ([f"threads={self.threads}"] if p.cfg.threads == 0 else [])
        cmd = [sys.executable, "-m", "fairdistill", "train", p.row.config, *argv] + (["--resume"] if p.action == "resume" else [])
        log = open(p.path / LOG, "a")
        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} sweep {self.spec.name}: {' '.join(cmd[1:])}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env())
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
            f = rd.read_result()["final"]
            self.progress.event(f"done {p.label} ({format_seconds(p.wall_s)}): accuracy {100 * f['accuracy']:.2f}, "
                                f"DEO_A {100 * f['deo_a']:.2f}, DEO_M {100 * f['deo_m']:.2f}")
        else:
            self.mark(p, "failed")
            p.reason = f"exit code {proc.returncode}: {last_error(p.path / LOG)} (log: {p.path / LOG})"
            self.progress.event(f"FAILED {p.label}: {p.reason}")

    def loop(self) -> None:
        todo = [p for p in self.plans if p.action in ("run", "resume")]
        while todo or self.running:
            for p in list(todo):
                t = p.teacher
                if t is not None and t.status in ("failed", "skipped", "conflict"):
                    todo.remove(p)
                    p.status, p.reason = "skipped", f"its teacher {t.label} {'was ' if t.status == 'skipped' else ''}{t.status}"
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


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_sweep(spec: SweepSpec, dry_run: bool = False, stream=None) -> SweepSummary:
    """Run every (row, seed) of ``spec`` (see the module docstring) and return what happened.

    ``dry_run`` prints the plan (run / resume / skip / conflict per run) and writes nothing.
    """
    stream = stream or sys.stderr
    claim_folder(spec, write=False)
    if dry_run:
        plans = plan_sweep(spec)
        stream.write(describe_plan(plans) + "\n")
        return SweepSummary(len(plans), dict(Counter(p.action for p in plans)), [], 0.0)
    with FolderLock(spec.out):
        return _run(spec, plan_sweep(spec), stream)


def _run(spec: SweepSpec, plans: list[RunPlan], stream) -> SweepSummary:
    claim_folder(spec, write=True)
    for p in plans:
        p.status = {"skip": "done", "conflict": "conflict"}.get(p.action, "pending")
        if p.action == "conflict":
            stream.write(f"not touched: {p.label}: {p.reason}\n")
    sweep = _Sweep(spec, plans, stream)
    reused = sum(p.action == "skip" for p in plans)
    stream.write(f"sweep {spec.name}: {len(plans)} runs ({reused} already finished) in {spec.out}, "
                 f"{spec.jobs} at a time, {sweep.threads} thread(s) each\n")
    t0 = time.perf_counter()
    # SIGTERM (a scheduler, `kill`) stops a sweep as Ctrl-C does: its runs stop and can be resumed
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    try:
        sweep.loop()
    except KeyboardInterrupt:
        sweep.interrupt()
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        sweep.progress.close()
        counts = dict(Counter(p.status for p in plans))
        problems = [f"{p.status}: {p.label}: {p.reason}" for p in plans if p.status in ("failed", "skipped", "conflict")]
        summary = SweepSummary(len(plans), counts, problems, time.perf_counter() - t0)
        write_json(Path(spec.out) / STATUS, {
            "sweep": spec.name, "ended": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": summary.wall_s,
            "jobs": spec.jobs, "threads_per_run": sweep.threads, "cpus": cpu_count(), "runs": len(plans),
            "reused": reused, "counts": counts, "problems": problems,
        })
    stream.write(f"sweep {spec.name}: {counts.get('done', 0)}/{len(plans)} done in {format_seconds(summary.wall_s)}"
                 + "".join(f"\n  {line}" for line in problems) + "\n")
    return summary


# ----------------------------------------------------------------------------- aggregation


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def error_rate(result: dict) -> float:
    """100 - accuracy (%) of the final epoch."""
    return 100.0 * (1.0 - result["final"]["accuracy"])


def summarize_mfd(results: list[dict]) -> dict[str, tuple[float, float | None]]:
    """metric -> (mean, sample std) over runs, x100, of the final accuracy, DEO_A and DEO_M."""
    return {m: mean_std([100.0 * r["final"][m] for r in results]) for m in LAYOUTS["mfd"]} if results else {}


def summarize_ofd(results: list[dict]) -> dict[str, float]:
    """Median, min and max over runs of the final error rate (%)."""
    errors = [error_rate(r) for r in results]
    return {"median": statistics.median(errors), "min": min(errors), "max": max(errors)} if errors else {}


def fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_paper(value) -> str:
    if value is None:
        return ""
    return fmt(*value) if isinstance(value, list) else fmt(value)


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    """``align``: one of l / r per column."""
    sep = ["---" if a == "l" else "---:" for a in align]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, sep, *rows])


@dataclass
class RowRuns:
    """A report row: the results of its finished runs, and what happened to the others."""

    row: RowSpec
    results: list
    missing: list  # "seed 2 failed", ...

    @property
    def runs(self) -> str:
        n = len(self.results)
        return f"{n}/{n + len(self.missing)}"


def mfd_table(entries: list[RowRuns], with_paper: bool) -> tuple[str, list[dict]]:
    """Markdown and CSV records of the mfd layout (paper values beside the measured ones)."""
    header, align, rows, records = ["Method"], "l", [], []
    for m in ("Accuracy", "DEO_A", "DEO_M"):
        header += [m, "(paper)"] if with_paper else [m]
        align += "rr" if with_paper else "r"
    header.append("Runs")
    align += "r"
    for e in entries:
        s = summarize_mfd(e.results)
        cells, rec = [e.row.label], {"method": e.row.label, "runs": len(e.results), "planned": len(e.row.seeds)}
        for m in LAYOUTS["mfd"]:
            mean, std = s.get(m, (None, None))
            cells.append(fmt(mean, std))
            rec[f"{m}_mean"], rec[f"{m}_std"] = mean, std
            paper = e.row.paper.get(m)
            if with_paper:
                cells.append(fmt_paper(paper))
            parts = paper if isinstance(paper, list) else [paper]
            rec[f"paper_{m}_mean"], rec[f"paper_{m}_std"] = parts[0], (parts[1] if len(parts) > 1 else None)
        cells.append(e.runs)
        rows.append(cells)
        records.append(rec)
    return markdown_table(header, rows, align), records


def ofd_table(entries: list[RowRuns], with_paper: bool) -> tuple[str, list[dict]]:
    """Markdown and CSV records of the ofd layout; rows with a ``column`` are pivoted."""
    records = []
    for e in entries:
        s = summarize_ofd(e.results)
        records.append({"method": e.row.label, "column": e.row.column or "", "runs": len(e.results),
                        "planned": len(e.row.seeds), "error_median": s.get("median"), "error_min": s.get("min"),
                        "error_max": s.get("max"), "paper_error": e.row.paper.get("error")})
    if any(e.row.column is not None for e in entries):
        labels = list(dict.fromkeys(e.row.label for e in entries))
        columns = list(dict.fromkeys(e.row.column or "" for e in entries))
        cell = {}
        for e, rec in zip(entries, records):
            text = fmt(rec["error_median"])
            if len(e.results) < len(e.row.seeds):
                text += f" ({e.runs})"
            if with_paper:
                text += f" / {fmt_paper(rec['paper_error']) or '-'}"
            cell[(e.row.label, e.row.column or "")] = text
        rows = [[lab, *(cell.get((lab, c), "") for c in columns)] for lab in labels]
        return markdown_table(["Method", *columns], rows, "l" + "r" * len(columns)), records
    header = ["Method", "Error (median)", *(["(paper)"] if with_paper else []), "min-max", "Runs"]
    rows = []
    for e, rec in zip(entries, records):
        span = "" if not e.results else f"{rec['error_min']:.2f}-{rec['error_max']:.2f}"
        rows.append([e.row.label, fmt(rec["error_median"]), *([fmt_paper(rec["paper_error"])] if with_paper else []),
                     span, e.runs])
    return markdown_table(header, rows, "l" + "r" * (len(header) - 1)), records


# ----------------------------------------------------------------------------- report


def run_state(path: Path, owner: dict) -> tuple[str, dict | None]:
    """(state, result) of one run of a sweep folder: done, failed, unfinished, not run, foreign."""
    marker = read_marker(path)
    if not owned(marker, owner):
        return ("not run", None) if marker is None and not path.exists() else ("not this sweep's run", None)
    rd = RunDir(path)
    if rd.finished:
        return "done", rd.read_result()
    return ("failed" if marker.get("status") == "failed" else "unfinished"), None


def collect(folder: str | Path) -> tuple[SweepSpec, list[RowRuns]]:
    """The saved spec of sweep folder ``folder`` and the runs of each table row."""
    folder = Path(folder)
    f = folder / SPEC_COPY
    if not f.is_file():
        raise RunDirError(f"{folder}: no {SPEC_COPY}, so not a sweep folder; run `fairdistill sweep SPEC` first")
    spec = load_spec(f, check_configs=False)
    entries = []
    for row in spec.rows:
        if not row.table:
            continue
        results, missing = [], []
        for s in row.seeds:
            state, result = run_state(run_path(folder, row, s), owner_of(spec, row, s))
            if result is not None:
                results.append(result)
            else:
                missing.append(f"seed {s} {state}")
        entries.append(RowRuns(row, results, missing))
    return spec, entries


def describe_measure(spec: SweepSpec) -> str:
    if spec.layout == "mfd":
        what = ("Accuracy, DEO_A and DEO_M (%) of the final epoch on the test set: mean ± sample standard deviation "
                "(ddof = 1) over the seeds")
    else:
        what = "Error rate (%) = 100 - accuracy of the final epoch on the test set: median over the runs"
    paper = f"; paper values (`(paper)`{' or after `/`' if spec.layout == 'ofd' else ''}): {spec.paper_source}" if spec.paper_source else ""
    return f"{what}; seeds {', '.join(map(str, spec.seeds))}{paper}."


def write_csv(path: Path, records: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]) if records else ["method"], lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in rec.items()})
    write_text(path, buf.getvalue())


def write_report(folder: str | Path, plot: bool = True) -> tuple[str, list[Path]]:
    """Write ``report.md``, ``report.csv`` and (``plot`` and matplotlib present, data with groups)
    ``accuracy_vs_deo.png`` into sweep folder ``folder``; returns the Markdown and the files."""
    folder = Path(folder)
    spec, entries = collect(folder)
    with_paper = any(e.row.paper for e in entries)
    table, records = (mfd_table if spec.layout == "mfd" else ofd_table)(entries, with_paper)
    parts = [f"# {spec.title or spec.name}", "", describe_measure(spec), "", table]
    missing = [f"- {e.row.name}: {', '.join(e.missing)}" for e in entries if e.missing]
    if missing:
        parts += ["", "Runs without a result (n/a where none finished):", *missing]
    status = folder / STATUS
    if status.is_file():
        st = json.loads(status.read_text())
        parts += ["", f"Last `fairdistill sweep` of this folder: {st['runs']} runs ({st['reused']} reused), "
                      f"wall time {format_seconds(st['wall_s'])}, {st['jobs']} at a time on {st['cpus']} CPU(s)."]
    done = [r for e in entries for r in e.results]
    if done:
        parts.append(f"Training time summed over the {len(done)} finished runs: "
                     f"{format_seconds(sum(r.get('wall_time_s', 0.0) for r in done))}.")
    files = [folder / "report.md", folder / "report.csv"]
    note = ""
    if plot and any(len(r.get("group_names") or []) > 1 for r in done):
        try:
            from .plots import accuracy_vs_deo

            png = accuracy_vs_deo([(e.row.label, e.results) for e in entries if e.results], folder / "accuracy_vs_deo.png",
                                  title=spec.title or spec.name)
            files.append(png)
            parts += ["", f"![accuracy vs DEO]({png.name})"]
        except FairdistillError as e:
            note = f"accuracy-vs-DEO plot skipped: {e}"
    text = "\n".join(parts) + "\n"
    write_text(files[0], text)
    write_csv(files[1], records)
    if note:
        print(note, file=sys.stderr)
    return text, files
