"""Sweep planning: which run directories a sweep owns, and what to do with each run.

Each run directory a sweep owns carries a ``sweep.json`` marker (sweep name, row, seed,
status). A sweep skips finished runs, resumes killed ones, and never touches a run directory
that holds another sweep's run (or a run no sweep made). A sweep folder holds the spec that
last ran there (``spec.yaml``) and, while a sweep runs, a lock with its process id.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import RunConfig, config_changes, load_config, safe_load
from ..errors import ConfigError, FairdistillError, RunDirError
from ..rundir import RunDir, write_text
from .spec import LOCK, MARKER, SPEC_COPY, RowSpec, SweepSpec, depth, run_overrides, run_path, spec_yaml, teacher_seed


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
            changed = config_changes(rd.read_config(), cfg, ignore=("out",))
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
