"""Where a sweep's runs run: the ``launcher:`` section of a spec (and its command-line flags).

``name: local`` (the default) runs every run as a process on this machine, ``jobs`` at once
(:mod:`.runner`). ``name: slurm`` submits one SLURM job per run through submitit
(:mod:`.slurm`); ``cluster: local`` keeps that code path but runs the jobs on this machine with
submitit's local executor (no scheduler needed: how the tests run it).

A spec may write ``launcher: slurm`` for ``launcher: {name: slurm}``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from ..errors import ConfigError
from ..registry import Range

PosInt = Annotated[int, Range(ge=1)]


@dataclass
class LauncherSpec:
    """The ``launcher:`` section of a spec; ``fairdistill sweep --launcher ... --partition ...`` override it.

    ``name``: local | slurm (see the module docstring). The other keys are for ``slurm``:
    ``cluster``: slurm (sbatch, the default) | local (submitit's local executor on this machine).
    ``partition``, ``account``: sbatch ``--partition`` / ``--account`` (null: the cluster's default).
    ``gpus_per_run``: GPUs of one run's job; with N > 1 the run is N tasks of PyTorch DDP (one
    process per GPU, as ``torchrun --nproc_per_node=N`` would start; see ``distributed.py``).
    ``cpus_per_run``: CPU cores of one run's job, shared by its tasks; each task trains with
    that many threads unless the run's config sets ``threads``.
    ``mem``: memory of one run's job, as sbatch ``--mem`` (``32G``, ``4000M``; a plain number is MB).
    ``time``: time limit of one job, as sbatch ``--time`` (``90`` minutes, ``HH:MM:SS``,
    ``D-HH[:MM[:SS]]``); quote it in YAML (an unquoted 24:00:00 reads as the number 86400). A job
    that reaches it (or is preempted) is requeued and resumes from its last epoch's checkpoint.
    ``max_parallel``: at most this many runs at once (null: as many as the cluster gives; with
    ``cluster: local``: the spec's ``jobs``).
    ``max_requeues``: how often a job that reached its time limit is requeued (submitit's
    ``max_num_timeout``); preemptions do not count.
    ``wait``: keep watching the jobs until every one has ended, with a progress line, and exit 0
    only if every run finished (always so with ``cluster: local``); otherwise ``sweep`` returns
    once the jobs are submitted and a later ``sweep`` of the same spec shows their state.
    """

    name: Literal["local", "slurm"] = "local"
    cluster: Literal["slurm", "local"] = "slurm"
    partition: Union[str, None] = None
    account: Union[str, None] = None
    gpus_per_run: Annotated[int, Range(ge=0)] = 0
    cpus_per_run: Union[PosInt, None] = None
    mem: Union[str, None] = None
    time: str = "24:00:00"
    max_parallel: Union[PosInt, None] = None
    max_requeues: Annotated[int, Range(ge=0)] = 10
    wait: bool = False

    @property
    def tasks(self) -> int:
        """Processes of one run's job: one per GPU, at least one."""
        return max(1, self.gpus_per_run)


_TIME = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")


def time_minutes(text: str, key: str = "launcher.time") -> int:
    """sbatch ``--time`` text as whole minutes (seconds rounded up): ``M``, ``M:S``, ``H:M:S``,
    ``D-H``, ``D-H:M``, ``D-H:M:S`` (SLURM's formats)."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise ConfigError(f"{key}: {text!r} is not a SLURM time; expected minutes ('90'), 'HH:MM:SS' or "
                          "'D-HH:MM:SS' (e.g. '1-12:00:00')")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "days" in g:
        seconds = ((g["days"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    elif "c" in g:
        seconds = (g["a"] * 60 + g["b"]) * 60 + g["c"]
    else:
        seconds = g["a"] * 60 + g.get("b", 0)
    if seconds <= 0:
        raise ConfigError(f"{key}: {text!r} is no time at all; give the job's time limit, e.g. '24:00:00'")
    return math.ceil(seconds / 60)


def check_launcher(spec: LauncherSpec) -> None:
    """Checks across keys and of the strings' formats (types and ranges are the annotations')."""
    time_minutes(spec.time)
    if spec.mem is not None and not re.fullmatch(r"\d+[KMGT]?", spec.mem.strip().upper()):
        raise ConfigError(f"launcher.mem: {spec.mem!r} is not a SLURM memory size; expected e.g. '32G' or '4000M'")
    for key in ("partition", "account"):
        value = getattr(spec, key)
        if value is not None and (not value.strip() or re.search(r"\s", value.strip())):
            raise ConfigError(f"launcher.{key}: {value!r} is not a SLURM {key} name (one word, no spaces)")
