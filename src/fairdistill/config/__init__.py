"""Run configuration: typed schema, YAML files with ``base`` inheritance and ``key=value``
overrides, method presets, and one validation pass (see each module).

``load_config(path, overrides)`` is the one entry point: read the file, expand the ``method``
presets under the explicit values, apply the overrides, parse into a :class:`RunConfig` and
validate it as a whole, before any data is read or model built.
"""
from __future__ import annotations

import copy
from pathlib import Path

from ..packaged import find_file
from ..plugins import import_plugins
from .files import apply_overrides, deep_merge, dump_yaml, parse_override, read_yaml, safe_load
from .presets import PRESETS, attach_unstaged_terms, expand_method
from .schema import (RESUMABLE, DataConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig, StageConfig,
                     TeacherConfig, config_changes, from_dict, stage_list, stage_optim, stage_schedule, to_dict)
from .validate import check_teacher, needs_teacher, validate

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "PRESETS", "RESUMABLE", "RunConfig", "ScheduleConfig", "StageConfig",
           "TeacherConfig", "apply_overrides", "check_teacher", "config_changes", "deep_merge", "dump_yaml", "expand_method",
           "from_dict", "load_config", "needs_teacher", "parse_override", "read_yaml", "resolve", "safe_load",
           "stage_list", "stage_optim", "stage_schedule", "to_dict", "validate"]


def resolve(data: dict, overrides: list[str] = ()) -> dict:
    """Expand the ``method`` presets under the explicit values, then apply ``overrides``.

    Overrides are applied before (to read ``method``) and again after the expansion (so they can
    reach into a preset's stages, e.g. ``stages.0.epochs=2``).
    """
    first = apply_overrides(data, list(overrides))
    full = deep_merge(expand_method(str(first.get("method", "scratch"))), data)
    return attach_unstaged_terms(apply_overrides(full, list(overrides)))


def load_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> RunConfig:
    """Read ``path`` (or use ``data``), import its ``plugins``, apply presets and overrides,
    validate, and return a RunConfig. A ``path`` that does not exist is looked up among the
    packaged configs (``fairdistill.packaged``: ``cifar10s/mfd``)."""
    raw = read_yaml(find_file(path)) if path is not None else copy.deepcopy(data or {})
    import_plugins(apply_overrides(raw, list(overrides)).get("plugins"))
    if path is not None and not raw.get("name"):
        raw["name"] = Path(path).stem
    cfg = from_dict(RunConfig, resolve(raw, overrides))
    validate(cfg)
    return cfg
