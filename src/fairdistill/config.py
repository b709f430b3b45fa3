"""Typed run configuration: YAML files, ``key=value`` overrides, method presets, validation.

A config file is YAML (read with ``yaml.safe_load``: configs never execute code). It may name
a ``base`` file (a path relative to itself, or a list of them) whose values it overrides;
mappings are merged key by key, everything else is replaced. Overrides on the command line
are dotted keys (``optim.lr=0.01``, ``terms.kd.T=4``) whose values are parsed as YAML scalars.
Every key is checked against the schema below before anything runs; an unknown key or a wrong
type raises :class:`ConfigError` naming the key, the expected type and the nearest valid key.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import re

import yaml

from .errors import ConfigError
from .registry import suggest


@dataclass
class DataConfig:
    """Data set and batch pipeline."""

    name: str = "digits-s"  #: data set name (``fairdistill.data.DATASETS``)
    root: str = "data"  #: folder holding the data set's standard on-disk layout
    options: dict = field(default_factory=dict)  #: data-set specific options (skew, val_fraction...)
    batch_size: int = 128  #: training batch size (global, over all processes)
    eval_batch_size: int = 512  #: evaluation batch size
    sampler: str = "uniform"  #: uniform | balanced (oversample (group, label) cells: MFD's SS)
    drop_last: bool = True  #: drop the last incomplete training batch
    padding: int = 0  #: reflect-pad then random-crop augmentation (0: off)
    flip: bool = False  #: random horizontal flip augmentation


@dataclass
class ModelConfig:
    """A zoo model (``fairdistill.models.MODELS``) and its options."""

    name: str = "mfd-cnn"
    options: dict = field(default_factory=dict)


@dataclass
class TeacherConfig:
    """Where the teacher comes from and how it runs.

    ``run`` names a finished run directory (its config gives the architecture and its
    checkpoint the weights). Alternatively ``checkpoint`` names a state-dict file and ``model``
    the architecture. ``bn_mode``: ``eval`` (running statistics) or ``train`` (batch statistics,
    as the official OFD code).
    """

    run: str = ""
    checkpoint: str = ""
    model: Union[ModelConfig, None] = None
    bn_mode: str = "eval"


@dataclass
class OptimConfig:
    """Optimizer: ``adam`` or ``sgd`` (momentum, optionally nesterov)."""

    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per epoch.

    ``none``; ``plateau`` (ReduceLROnPlateau on ``monitor``: ``test_loss`` as the MFD code, or
    ``val_loss`` with a validation split); ``multistep`` (``milestones``, ``gamma``);
    ``cosine`` (to ``min_lr`` over the stage's epochs).
    """

    name: str = "none"
    monitor: str = "test_loss"
    factor: float = 0.1
    patience: int = 10
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class StageConfig:
    """One training stage. Multi-stage recipes (FitNets hints, FT paraphraser, AB init) are lists.

    ``epochs``: epochs of this stage (None: the run's ``epochs``); ``epochs_scale``: instead, a
    fraction of the run's ``epochs`` (e.g. 0.5 for MFD's FitNet hint stage). ``terms``: names of
    the active terms (None: all). ``ce_weight``: weight of the cross-entropy on labels.
    ``train``: what is optimised: ``student`` and/or term names (None: the student and every
    active term). ``optim`` / ``schedule``: overrides of the run's sections for this stage.
    ``teacher_bn_mode``: overrides ``teacher.bn_mode`` in this stage (e.g. AB's initialisation).
    """

    name: str = "main"
    epochs: Union[int, None] = None
    epochs_scale: Union[float, None] = None
    terms: Union[list, None] = None
    ce_weight: float = 1.0
    train: Union[list, None] = None
    optim: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    teacher_bn_mode: Union[str, None] = None


@dataclass
class RunConfig:
    """One training run. See the README for every key."""

    name: str = ""  #: a label for tables (defaults to the config file's stem)
    out: str = ""  #: run directory (default ``runs/<data.name>/<name>/seed<seed>``)
    seed: int = 0
    epochs: int = 50
    device: str = "cpu"  #: cpu | cuda | cuda:N
    method: str = "scratch"  #: a preset or presets joined by '+', e.g. ``ss+hkd``
    terms: dict = field(default_factory=dict)  #: term name -> {type, weight, weight_end, options...}
    stages: list = field(default_factory=list)  #: list of StageConfig (empty: one main stage)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval_every: int = 1  #: evaluate on the test set every N epochs (and always at the end)
    progress: bool = True  #: show a progress line while training
    deterministic: bool = True  #: ask PyTorch for deterministic kernels
    threads: int = 0  #: CPU threads for PyTorch (0: PyTorch's default)
    amp: str = "off"  #: mixed precision: off | bf16 | fp16 (fp16 uses a GradScaler)
    channels_last: bool = False  #: NHWC memory layout for models and inputs
    compile: bool = False  #: torch.compile the student's and teacher's forwards


# ----------------------------------------------------------------------------- parsing


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` (no dot, YAML 1.2 style) as a float."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def safe_load(text: str):
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str):
    """Check ``value`` against annotation ``tp`` (with int -> float widening) or fail naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    check = {list: list, dict: dict}.get(origin or tp, tp)
    if check is int and isinstance(value, bool) or not isinstance(value, check):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: Any, key: str = ""):
    """Build dataclass ``cls`` from a mapping, validating every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        full = f"{key}.{k}" if key else str(k)
        if k not in fields:
            raise ConfigError(f"{full}: unknown key.{suggest(k, fields)} Valid keys: {', '.join(sorted(fields))}.")
        kwargs[k] = _coerce(v, hints[k], full)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key, other values are replaced."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a config file and the ``base`` files it names (relative to it), merged."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files form a cycle")
    try:
        data = safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got {type(data).__name__}")
    bases = data.pop("base", [])
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_yaml(path.parent / b, _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.01"`` -> (["optim", "lr"], 0.01); the value is a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. epochs=10 or optim.lr=0.01")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted key; an integer part indexes into a list (``stages.0.epochs=2``)."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {text!r}: {p!r} is not an index of a list of {len(node)} items")
                p = int(p)
                if last:
                    node[p] = value
                else:
                    node = node[p]
                continue
            if last:
                node[p] = value
            else:
                if not isinstance(node.get(p), (dict, list)):
                    node[p] = {}
                node = node[p]
    return data


def resolve(data: dict, overrides: list[str] = ()) -> dict:
    """Expand the ``method`` presets under the explicit values, then apply ``overrides``.

    Overrides are applied before (to read ``method``) and again after the expansion (so they can
    reach into a preset's stages, e.g. ``stages.0.epochs=2``).
    """
    from .methods.presets import attach_unstaged_terms, expand_method

    first = apply_overrides(data, list(overrides))
    full = deep_merge(expand_method(str(first.get("method", "scratch"))), data)
    return attach_unstaged_terms(apply_overrides(full, list(overrides)))


def load_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> RunConfig:
    """Read ``path`` (or use ``data``), apply presets and overrides, validate, and return a RunConfig."""
    raw = read_yaml(path) if path is not None else copy.deepcopy(data or {})
    if path is not None and not raw.get("name"):
        raw["name"] = Path(path).stem
    cfg = from_dict(RunConfig, resolve(raw, overrides))
    validate(cfg)
    return cfg


CHOICES = {
    ".amp": ("off", "bf16", "fp16"),
    "data.sampler": ("uniform", "balanced"),
    "teacher.bn_mode": ("eval", "train"),
    "optim.name": ("adam", "sgd"),
    "schedule.name": ("none", "plateau", "multistep", "cosine"),
    "schedule.monitor": ("test_loss", "val_loss"),
}


def check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not valid.{suggest(value, choices)} Valid choices: {', '.join(choices)}.")


def validate(cfg: RunConfig) -> None:
    """Checks that span keys or need registries; types were checked while parsing."""
    from .data import DATASETS
    from .methods import TERMS
    from .models import MODELS

    for key, choices in CHOICES.items():
        section, attr = key.split(".")
        check_choice(key.lstrip("."), getattr(getattr(cfg, section) if section else cfg, attr), choices)
    for key, value in (("seed", cfg.seed), ("epochs", cfg.epochs), ("threads", cfg.threads), ("eval_every", cfg.eval_every - 1),
                       ("data.batch_size", cfg.data.batch_size - 1), ("data.eval_batch_size", cfg.data.eval_batch_size - 1),
                       ("data.padding", cfg.data.padding)):
        if value < 0:
            raise ConfigError(f"{key}: must be {'>= 0' if key in ('seed', 'epochs', 'threads', 'data.padding') else '>= 1'}")
    if not (cfg.device == "cpu" or cfg.device == "cuda" or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: expected cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    DATASETS.get(cfg.data.name, key="data.name")
    MODELS.get(cfg.model.name, key="model.name")
    if cfg.teacher.model is not None:
        MODELS.get(cfg.teacher.model.name, key="teacher.model.name")
    for name, spec in cfg.terms.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"terms.{name}: expected a mapping of term options, got {spec!r}")
        TERMS.get(spec.get("type", name), key=f"terms.{name}.type")
    stages = [from_dict(StageConfig, s, f"stages[{i}]") for i, s in enumerate(cfg.stages)]
    for i, st in enumerate(stages):
        for t in st.terms or []:
            if t not in cfg.terms:
                raise ConfigError(f"stages[{i}].terms: no term named {t!r}.{suggest(t, cfg.terms)} Terms: {', '.join(cfg.terms) or 'none'}.")
        if st.teacher_bn_mode is not None:
            check_choice(f"stages[{i}].teacher_bn_mode", st.teacher_bn_mode, CHOICES["teacher.bn_mode"])
        for t in st.train or []:
            if t != "student" and t not in cfg.terms:
                raise ConfigError(f"stages[{i}].train: {t!r} is neither 'student' nor a term name.")
    if cfg.schedule.name == "plateau" and cfg.schedule.monitor == "val_loss" and not cfg.data.options.get("val_fraction"):
        raise ConfigError("schedule.monitor: val_loss needs a validation split: set data.options.val_fraction (e.g. 0.1)")


def stage_list(cfg: RunConfig) -> list[StageConfig]:
    """The run's stages with epochs resolved (one main stage when ``stages`` is empty)."""
    stages = [from_dict(StageConfig, s, f"stages[{i}]") for i, s in enumerate(cfg.stages)] or [StageConfig()]
    for st in stages:
        if st.epochs is None:
            st.epochs = int(round(cfg.epochs * st.epochs_scale)) if st.epochs_scale is not None else cfg.epochs
    return stages


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
