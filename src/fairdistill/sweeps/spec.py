"""Sweep specs: a grid of rows (a config, overrides, the row that trains its teacher) x seeds.

A *spec* (YAML, read safely) names a grid: rows times seeds, a table layout and the papers'
values. :func:`load_spec` checks it as a whole before anything runs, including every row's
config with its overrides (unknown file, key or name fail here, naming the row). Paths in a spec
(config files, ``out``) are relative to the current directory, as on the command line.

The layouts (``LAYOUTS``) are those of :mod:`fairdistill.report`: ``mfd`` (accuracy, DEO_A,
DEO_M as mean ± std over seeds), ``ofd`` (error rate, median of runs), and for dense runs ``seg``
(mIoU, mIoU gap between groups, DEO_A/DEO_M on per-(group, class) pixel recall, IoU gaps) and
``det`` (mAP, mAP gap, AP gaps, DEO_A/DEO_M on per-(group, class) recall), mean ± std over seeds.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import yaml

from ..config import from_dict, load_config, needs_teacher, parse_override, safe_load
from ..errors import ConfigError
from ..packaged import find_file
from ..registry import check_choice, check_number, suggest
from ..rundir import RunDir
from .launcher import LauncherSpec, check_launcher

LAYOUTS = {
    "mfd": ("accuracy", "deo_a", "deo_m"),
    "ofd": ("error",),
    "seg": ("miou", "miou_gap", "deo_a", "deo_m", "iou_gap_a", "iou_gap_m"),
    "det": ("map", "map_gap", "ap_gap_a", "ap_gap_m", "deo_a", "deo_m"),
}
"""Table layout -> the metrics of its paper columns (``seg``/``det``: keys of a dense run's
``result.json`` ``final``, ``fairdistill.tasks``' ``final_keys``)."""
MARKER = "sweep.json"  #: ownership marker in each run directory of a sweep
LOG = "train.log"  #: each run's captured output, next to its files
SPEC_COPY = "spec.yaml"  #: the effective spec, saved in the sweep folder when it starts
STATUS = "sweep_status.json"  #: the last sweep invocation's counts and wall time
LOCK = "sweep.lock"  #: held (with the process id) while a sweep runs in the folder


@dataclass
class RowSpec:
    """One table row: a config run over the seeds.

    ``teacher`` names the row whose runs are this row's teacher (``teacher.run`` is set to that
    row's run of the same seed, or of ``teacher_seed``). ``seeds`` overrides the spec's seeds
    (e.g. ``[0]`` for a teacher trained once). ``table: false`` hides the row from the report.
    ``paper`` holds the paper's values: ``accuracy``/``deo_a``/``deo_m`` as ``[mean, std]`` (mfd
    layout), ``error`` (ofd layout) or the seg/det layout's metrics (e.g. ``miou``), in %. ``label``/``column`` place the row in the report (ofd:
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
    ``overrides`` apply to every run, before each row's own. ``launcher`` says where the runs
    run (:class:`~fairdistill.sweeps.launcher.LauncherSpec`: local processes or SLURM jobs).
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
    launcher: LauncherSpec = field(default_factory=LauncherSpec)

    def row(self, name: str) -> RowSpec:
        return next(r for r in self.rows if r.name == name)


def slug(name: str) -> str:
    """A folder name for a row name: lower case, runs of other characters as ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def load_spec(path: str | Path, overrides: list[str] = (), out: str | None = None, jobs: int | None = None,
              check_configs: bool = True, launcher: dict | None = None) -> SweepSpec:
    """Read and validate a spec; ``overrides``, ``out``, ``jobs`` and ``launcher`` (keys of the
    ``launcher:`` section, over the spec's) come from the command line.

    With ``check_configs`` every row's config is loaded with its overrides (unknown file, key or
    name fail here, naming the row), so a bad spec fails before anything runs.
    """
    path = find_file(path, "specs")  # a SPEC that is no path: the packaged specs (packaged.py)
    if not path.is_file():
        raise ConfigError(f"spec file {path} does not exist")
    try:
        data = safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a spec must be a mapping (name, seeds, rows, ...), got {type(data).__name__}")
    if isinstance(data.get("launcher"), str):  # `launcher: slurm` is short for `launcher: {name: slurm}`
        data["launcher"] = {"name": data["launcher"]}
    if launcher and isinstance(data.get("launcher") or {}, dict):
        data["launcher"] = {**(data.get("launcher") or {}), **launcher}
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
    for i, s in enumerate(seeds):
        check_number(s, f"{key}[{i}]", integer=True, ge=0)
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
        check_choice(spec.layout, LAYOUTS, "layout")
        _check_seeds(spec.seeds, "seeds")
        check_number(spec.jobs, "jobs", integer=True, ge=1)
        check_launcher(spec.launcher)
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
        if not 1 <= len(parts) <= 2:
            raise ConfigError(f"{key}.{metric}: expected a number or [mean, std], got {value!r}")
        for v in parts:
            check_number(v, f"{key}.{metric}")


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


def check_row_configs(spec: SweepSpec, where: str = "spec") -> None:
    """Load every row's config with its overrides (first seed); fail naming the row and key."""
    for i, row in enumerate(spec.rows):
        try:
            cfg = load_config(row.config, run_overrides(spec, row, row.seeds[0]))
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
