"""The main job of ``make demo``: a teacher and students on the embedded digits-s data set.

Every row is a config in ``configs/digits_s/``; the teacher is trained first (with seed
1000 + s, so that it is a different network from the scratch student of seed s) and the students
that need it read it through ``teacher.run``. Finished runs are reused (never overwritten) and
unfinished ones resumed, so a second ``make demo`` only prints the table. A finished run whose
``result.json`` is damaged is reported as such (a warning, and ``Runs`` counts it missing) and
the table still holds every other run.

The demo is generic over a task: ``task`` picks a folder of configs (:data:`DEMOS`) and its
rows, and the table takes the columns of the task's report layout (:data:`LAYOUT`: classification
``mfd``, segmentation ``seg``, detection ``det``, as ``fairdistill report``). The segmentation
demo's folder holds ``teacher.yaml``, ``scratch.yaml``, ``kd.yaml`` and ``ofd.yaml``
(:data:`DENSE_ROWS`), the detection demo's the same without ``kd.yaml`` (per-pixel KD has no
detection form here); their runs go under ``OUT/<task>/`` so that they never meet the
classification demo's runs in ``OUT/``. Given only ``configs``, the task is that of the folder's
teacher data set, so a new folder plugs in by its configs alone.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import load_config
from .engine import train
from .packaged import find_dir
from .errors import ConfigError, RunDirError
from .report import TABLES, TableRow
from .rundir import RunDir
from .tasks import task_of

log = logging.getLogger(__name__)

TEACHER = ("Teacher (scratch)", "teacher.yaml")
TEACHER_SEED_OFFSET = 1000
ROWS = [
    ("Student (scratch)", "scratch.yaml"),
    ("HKD", "hkd.yaml"),
    ("SS", "ss.yaml"),
    ("OFD", "ofd.yaml"),
    ("MFD", "mfd.yaml"),
]
DENSE_ROWS = [
    ("Student (scratch)", "scratch.yaml"),
    ("KD", "kd.yaml"),
    ("OFD", "ofd.yaml"),
]
DEMOS = {
    "classification": ("configs/digits_s", ROWS),
    "segmentation": ("configs/digits_s_seg", DENSE_ROWS),
    "detection": ("configs/digits_s_det", [r for r in DENSE_ROWS if r[0] != "KD"]),  # KD has no detection form
}
"""Task -> (its demo's config folder, its student rows)."""
LAYOUT = {"classification": "mfd", "segmentation": "seg", "detection": "det"}
"""Task -> the report layout whose columns its demo table shows."""


def run_or_reuse(config: Path, overrides: list[str]) -> dict | None:
    """Train ``config`` unless its run directory already holds a finished run; resume a killed one.

    Returns the run's ``result.json`` contents, or None (with a warning) when a finished run's
    ``result.json`` is damaged."""
    cfg = load_config(config, overrides)
    rd = RunDir(cfg.out)
    if rd.finished:
        try:
            return rd.read_result()
        except RunDirError as e:
            log.warning("%s; the demo table leaves this run out", e)
            return None
    return train(cfg, resume=rd.started)


def table(rows: list[tuple[str, list]], layout: str = "mfd") -> str:
    """A Markdown table: one row per method, the columns of report layout ``layout`` (mfd:
    accuracy / DEO_A / DEO_M; seg, det: see ``report``) x100, mean ± std over seeds; a None
    among a row's results is a damaged run (``Runs`` counts it missing)."""
    entries = [TableRow(name, [r for r in rs if r is not None],
                        missing=[f"seed {s} damaged" for s, r in enumerate(rs) if r is None]) for name, rs in rows]
    return TABLES[layout](entries, with_paper=False)[0]


def demo_plan(configs: str | None, task: str | None, overrides=()) -> tuple[Path, str, list, str]:
    """(config folder, task, student rows, data set name) of a demo: the folder of ``task``
    (default classification) unless ``configs`` names one, whose teacher's data set must then
    be of ``task`` when both are given."""
    if task is not None and task not in DEMOS:
        raise ConfigError(f"--task: unknown task {task!r}; valid tasks: {', '.join(DEMOS)}")
    folder = find_dir(configs if configs is not None else DEMOS[task or "classification"][0], "configs")
    if not (folder / TEACHER[1]).is_file():
        raise ConfigError(f"--configs: {folder} holds no {TEACHER[1]}; run the demo from the repository root or pass --configs")
    data = load_config(folder / TEACHER[1], list(overrides)).data.name
    found = task_of(data)
    if task is not None and found != task:
        raise ConfigError(f"--configs: {folder} trains on {data}, {found} data, not {task}; pass a {task} folder "
                          f"(e.g. {DEMOS[task][0]}) or leave --task out")
    rows = DEMOS[found][1]
    missing = [file for _, file in rows if not (folder / file).is_file()]
    if missing:
        raise ConfigError(f"--configs: {folder} lacks {', '.join(missing)}; a {found} demo folder holds "
                          f"{', '.join(f for _, f in [TEACHER, *rows])}")
    return folder, found, rows, data


def run_demo(out: str = "runs/demo", configs: str | None = None, seeds: int = 1, overrides=(),
             task: str | None = None) -> str:
    """Train (or reuse) the demo's runs and print and return its table.

    ``configs``: the folder of configs (default: that of ``task``); ``task``: classification
    (default), segmentation or detection; dense runs go under ``OUT/<task>/``."""
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds: the demo needs 1 seed or more, got {seeds!r}")
    folder, task, rows, data = demo_plan(configs, task, overrides)
    if task != "classification":
        out = f"{out}/{task}"
    t0 = time.perf_counter()
    results: dict[str, list[dict | None]] = {}
    for seed in range(seeds):
        teacher_dir = f"{out}/teacher/seed{seed}"
        common = [*overrides, f"seed={seed}"]
        print(f"== seed {seed}: {TEACHER[0]}")
        teacher_args = [*overrides, f"seed={TEACHER_SEED_OFFSET + seed}", f"out={teacher_dir}"]
        results.setdefault(TEACHER[0], []).append(run_or_reuse(folder / TEACHER[1], teacher_args))
        for name, file in rows:
            print(f"== seed {seed}: {name}")
            run_out = f"{out}/{Path(file).stem}/seed{seed}"
            extra = [f"teacher.run={teacher_dir}"] if load_config(folder / file, common).terms else []
            results.setdefault(name, []).append(run_or_reuse(folder / file, [*common, *extra, f"out={run_out}"]))
    text = table([(name, results[name]) for name, _ in [TEACHER, *rows]], LAYOUT[task])
    print(f"\n{data}, {seeds} seed(s), x100, final epoch ({time.perf_counter() - t0:.0f} s):\n")
    print(text)
    return text
