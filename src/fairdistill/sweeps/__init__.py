"""Sweeps over configs x seeds: specs (spec), which runs and what to do with each (plan), and
the local runner (runner). Reports of a sweep folder are :mod:`fairdistill.report`'s."""
from __future__ import annotations

from .plan import FolderLock, RunPlan, claim_action, collect, owner_of, plan_sweep
from .runner import SweepSummary, run_sweep, stop
from .spec import LAYOUTS, LOCK, MARKER, SPEC_COPY, STATUS, RowSpec, SweepSpec, load_spec, run_overrides

__all__ = ["FolderLock", "LAYOUTS", "LOCK", "MARKER", "RowSpec", "RunPlan", "SPEC_COPY", "STATUS", "SweepSpec",
           "SweepSummary", "claim_action", "collect", "load_spec", "owner_of", "plan_sweep", "run_overrides", "run_sweep",
           "stop"]
