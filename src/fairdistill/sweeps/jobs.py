"""The scheduler's side of a sweep folder, readable without submitit: the job ids a sweep
submitted (``jobs.json``) and what the scheduler says of them, and whether a process is alive.

``jobs.json`` maps each run (``<row dir>/seed<S>``) to its latest job: ``{"job": id,
"cluster": "slurm" | "local", "submitted": time}``. SLURM is asked through ``sacct`` (every job,
also ended ones) and, where accounting is off, ``squeue`` (jobs still known to the scheduler);
a job of submitit's local executor is its controller process on this machine.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import time
from pathlib import Path

from ..rundir import write_json

JOBS = "jobs.json"  #: the job of every submitted run, in the sweep folder

QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESIZING",
                    "RESV_DEL_HOLD", "STOPPED"})
"""SLURM job states of a job waiting to run (or to run again)."""
RUNNING = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"})
"""SLURM job states of a job that runs. Every other state (COMPLETED, FAILED, CANCELLED, TIMEOUT,
NODE_FAIL, OUT_OF_MEMORY, PREEMPTED, BOOT_FAIL, DEADLINE; ENDED for a local job) has ended."""


class JobStore:
    """``jobs.json`` of a sweep folder (written only by the sweep holding the folder's lock)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / JOBS
        try:
            data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            data = {}  # damaged: the run folders still tell what is done
        self.runs: dict = data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict | None:
        entry = self.runs.get(key)
        return entry if isinstance(entry, dict) and entry.get("job") is not None else None

    def record(self, key: str, job_id: str, cluster: str) -> None:
        self.runs[key] = {"job": str(job_id), "cluster": cluster, "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(self.path, self.runs)


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _parse(text: str) -> dict[str, str]:
    states = {}
    for line in text.splitlines():
        job, _, state = line.strip().partition("|")
        if job and state:
            states[job] = state.split()[0].rstrip("+")  # "CANCELLED by 1000" -> CANCELLED
    return states


def slurm_states(ids: list[str]) -> dict[str, str]:
    """job id -> SLURM state of each of ``ids`` the scheduler answers for ({} when it cannot be
    asked). ``squeue`` lists live jobs only: a job it does not list has ENDED."""
    ids = sorted(set(map(str, ids)))
    if not ids:
        return {}
    text = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)])
    if text is not None:
        states = _parse(text)
        return {i: states[i] for i in ids if i in states}
    text = _run(["squeue", "-h", "-o", "%i|%T", "-u", getpass.getuser()])
    if text is None:
        return {}
    live = _parse(text)
    return {i: live.get(i, "ENDED") for i in ids}


def process_alive(pid: int, expect: tuple[str, ...] = ()) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie does not) and, where /proc tells,
    whether its command line holds one of ``expect`` (so a recycled process id does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OverflowError, ValueError):
        return False
    proc = Path(f"/proc/{pid}")
    try:
        if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        if expect:
            cmdline = proc.joinpath("cmdline").read_bytes().decode(errors="replace")
            return any(e in cmdline for e in expect)
    except (OSError, IndexError):
        pass
    return True


def local_states(ids: list[str]) -> dict[str, str]:
    """RUNNING or ENDED for jobs of submitit's local executor (id = the controller's process id)."""
    return {i: "RUNNING" if i.isdigit() and process_alive(int(i), ("submitit",)) else "ENDED" for i in map(str, ids)}


def scheduler_states(entries: list[dict]) -> dict[str, str]:
    """job id -> state for ``JobStore`` entries of either cluster."""
    states: dict[str, str] = {}
    for cluster, ask in (("slurm", slurm_states), ("local", local_states)):
        ids = [e["job"] for e in entries if e.get("cluster") == cluster]
        if ids:
            states.update(ask(ids))
    return states


def this_host() -> str:
    return socket.gethostname()
