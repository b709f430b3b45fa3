"""The main job of ``make demo``: a teacher and students on the embedded digits-s data set.

Every row is a config in ``configs/digits_s/``; the teacher is trained first (with seed
1000 + s, so that it is a different network from the scratch student of seed s) and the students
that need it read it through ``teacher.run``. Finished runs are reused (never overwritten) and
unfinished ones resumed, so a second ``make demo`` only prints the table. A finished run whose
``result.json`` is damaged is reported as such (a warning, and ``Runs`` counts it missing) and
the table still holds every other run.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import load_config
from .engine import train
from .packaged import find_dir
from .errors import ConfigError, RunDirError
from .report import TableRow, mfd_table
from .rundir import RunDir

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


def table(rows: list[tuple[str, list]]) -> str:
    """A Markdown table: one row per method, accuracy / DEO_A / DEO_M x100 (mean ± std over seeds);
    a None among a row's results is a damaged run (``Runs`` counts it missing)."""
    entries = [TableRow(name, [r for r in rs if r is not None],
                        missing=[f"seed {s} damaged" for s, r in enumerate(rs) if r is None]) for name, rs in rows]
    return mfd_table(entries, with_paper=False)[0]


def run_demo(out: str = "runs/demo", configs: str = "configs/digits_s", seeds: int = 1, overrides=()) -> str:
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds: the demo needs 1 seed or more, got {seeds!r}")
    folder = find_dir(configs, "configs")  # from any folder: the packaged configs (packaged.py)
    if not (folder / TEACHER[1]).is_file():
        raise ConfigError(f"--configs: {folder} holds no {TEACHER[1]}; run the demo from the repository root or pass --configs")
    t0 = time.perf_counter()
    results: dict[str, list[dict | None]] = {}
    for seed in range(seeds):
        teacher_dir = f"{out}/teacher/seed{seed}"
        common = [*overrides, f"seed={seed}"]
        print(f"== seed {seed}: {TEACHER[0]}")
        teacher_args = [*overrides, f"seed={TEACHER_SEED_OFFSET + seed}", f"out={teacher_dir}"]
        results.setdefault(TEACHER[0], []).append(run_or_reuse(folder / TEACHER[1], teacher_args))
        for name, file in ROWS:
            print(f"== seed {seed}: {name}")
            run_out = f"{out}/{Path(file).stem}/seed{seed}"
            extra = [f"teacher.run={teacher_dir}"] if load_config(folder / file, common).terms else []
            results.setdefault(name, []).append(run_or_reuse(folder / file, [*common, *extra, f"out={run_out}"]))
    text = table([(name, results[name]) for name, _ in [TEACHER, *ROWS]])
    print(f"\ndigits-s, {seeds} seed(s), x100, final epoch ({time.perf_counter() - t0:.0f} s):\n")
    print(text)
    return text
