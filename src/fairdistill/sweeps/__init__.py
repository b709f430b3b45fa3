"""Sweeps over configs x seeds: specs (spec, launcher), which runs and what to do with each
(plan), the state of every run (state, jobs), the local runner (runner, child) and SLURM jobs
through submitit (slurm). Reports of a sweep folder are :mod:`fairdistill.report`'s.

The names below load their module on first use, so that a run's process
(:mod:`.child`) can arrange to die with its sweep before anything heavy is imported.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "FolderLock": "plan", "RunPlan": "plan", "claim_action": "plan", "collect": "state", "owner_of": "plan",
    "plan_sweep": "plan",
    "SweepSummary": "session", "run_sweep": "runner", "stop": "runner",
    "LAYOUTS": "spec", "LOCK": "spec", "MARKER": "spec", "SPEC_COPY": "spec", "STATUS": "spec", "RowSpec": "spec",
    "SweepSpec": "spec", "load_spec": "spec", "run_overrides": "spec",
    "LauncherSpec": "launcher",
    "RunState": "state", "plan_states": "state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
