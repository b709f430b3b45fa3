"""Building a run's parts from its config: device, data and loaders, student, teacher, terms.

Also the one function that rebuilds a finished run's model from its folder
(:func:`load_run_model`), shared by ``eval``, ``tsne`` and the plots.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import RunConfig
from ..data import build_dataset
from ..data.augment import CropSpec
from ..distributed import DistContext
from ..errors import ConfigError
from ..methods.base import SetupContext
from ..methods.objective import Objective
from ..models import FeatureModel, build_model
from ..models.weights import load_weights as load_weights_file
from ..models.weights import read_state_dict
from ..rundir import RunDir

log = logging.getLogger(__name__)
from ..tasks import TASKS, Task, task_of
from .checkpoint import load_run_checkpoint, load_weights
from .defaults import resolve_channels_last


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available here; use device=cpu")
    return torch.device(name)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(threads: int) -> int:
    """``threads`` capped, with a warning, at :func:`available_cores` (``threads=1000`` once
    started 1,513 threads and stalled a 2-core machine)."""
    cores = available_cores()
    if threads > cores:
        log.warning("threads: %d is more than the %d CPU core(s) available here; using %d", threads, cores, cores)
        return cores
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_out(cfg: RunConfig) -> str:
    """The run directory when ``out`` is not set: ``runs/<data>/<name>/seed<seed>``."""
    return f"runs/{cfg.data.name}/{cfg.name or 'run'}/seed{cfg.seed}"


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_state(model: nn.Module, state: dict, where: str) -> None:
    """Load ``state`` into ``model`` (a DDP ``module.`` prefix is dropped) or fail naming ``where``."""
    try:
        model.load_state_dict(strip_prefix(state))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"{where}: weights do not fit the model ({' '.join(first[:3])[:400]})") from None


# ----------------------------------------------------------------------------- data


def build_task(cfg: RunConfig) -> Task:
    """The task of ``cfg``'s data set with the config's ``task`` options."""
    return TASKS.get(task_of(cfg.data.name))(**cfg.task)


@dataclass
class RunData:
    """The data sets of a run, their loaders (batch sizes per process) and the task."""

    task: Task
    train_set: object
    test_set: object
    val_set: object | None
    train_loader: object
    test_loader: object
    val_loader: object | None

    @property
    def num_classes(self) -> int:
        return self.train_set.num_classes

    @property
    def num_groups(self) -> int:
        return self.train_set.num_groups


def build_data(cfg: RunConfig, device: torch.device, dist: DistContext) -> RunData:
    """Train, test (and with ``data.options.val_fraction`` val) sets and their loaders."""
    task = build_task(cfg)
    d, ws = cfg.data, dist.world_size
    kwargs = dict(root=d.root, seed=cfg.seed, **d.options)
    train_set = build_dataset(d.name, split="train", **kwargs)
    test_set = build_dataset(d.name, split="test", **kwargs)
    val_set = build_dataset(d.name, split="val", **kwargs) if d.options.get("val_fraction") else None
    if len(train_set) < d.batch_size and d.drop_last:
        raise ConfigError(
            f"data.batch_size: {d.batch_size} is larger than the training set ({len(train_set)} items) "
            "with data.drop_last=true; lower the batch size"
        )
    if d.batch_size % ws:
        raise ConfigError(f"data.batch_size: the global batch {d.batch_size} must divide evenly over {ws} processes")
    shard = dict(cfg=cfg, device=device, seed=cfg.seed, rank=dist.rank, world_size=ws)
    # batch sizes are per process: the global batch split evenly
    train_loader = task.loader(train_set, d.batch_size // ws, train=True, **shard)
    eval_batch = max(d.eval_batch_size // ws, 1)
    test_loader = task.loader(test_set, eval_batch, train=False, **shard)
    val_loader = task.loader(val_set, eval_batch, train=False, **shard) if val_set else None
    return RunData(task, train_set, test_set, val_set, train_loader, test_loader, val_loader)


# ----------------------------------------------------------------------------- models


def input_shape_of(dataset) -> tuple[int, ...] | None:
    """(C, H, W) of a data set's stored images, or None for sets of varying sizes."""
    shape = getattr(dataset, "image_shape", None)
    return tuple(shape) if shape else None


def build_run_model(model_cfg, outputs: int, input_shape=None, key: str = "model") -> FeatureModel:
    """The model a ``ModelConfig`` names (zoo name or import path, options, feature positions)
    with ``outputs`` outputs, for images of ``input_shape`` (C, H, W)."""
    return build_model(model_cfg.name, outputs, key=key, features=model_cfg.features, input_shape=input_shape,
                       **model_cfg.options)


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a fairdistill checkpoint that carries a checksum (read memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file: read_state_dict says what it is
        return False
    return isinstance(state, dict) and "format" in state and "checksum" in state


def read_weights(path, key: str) -> dict:
    """The tensors of a weights source: a finished run folder or a fairdistill checkpoint file
    (verified by ``engine/checkpoint.py``: checksum, and the fingerprint of a run's config.yaml
    beside it), or any other weights file (``models.weights.read_state_dict``)."""
    p = Path(path)
    if p.is_dir():
        if not RunDir(p).finished:
            raise ConfigError(f"{key}: {path} is a folder but not a finished run (no result.json); name a finished "
                              "run folder or a weights file")
        return dict(load_run_checkpoint(p)["model"])
    if p.is_file() and p.suffix != ".safetensors" and is_checkpoint(p):
        return dict(load_weights(p))
    return read_state_dict(p, key)


def initialise(model: FeatureModel, path, key: str, outputs: int, head: str = "refuse") -> dict:
    """Load ``path`` (:func:`read_weights`) into ``model`` (``models/weights.py``); the report."""
    return load_weights_file(model, path, key, outputs, head, state=read_weights(path, key))


def build_student(cfg: RunConfig, outputs: int, data: RunData, device: torch.device,
                  reports: dict | None = None) -> FeatureModel:
    """The student on ``device``, initialised from ``model.weights`` when set
    (``models/weights.py``); what was loaded goes to ``reports["student"]``."""
    model = build_run_model(cfg.model, outputs, input_shape_of(data.test_set))
    if cfg.model.weights:
        report = initialise(model, cfg.model.weights, "model.weights", outputs, cfg.model.weights_head)
        if reports is not None:
            reports["student"] = report
    return model.to(device)


def teacher_weights(model: nn.Module, path, key: str, outputs: int, data: str) -> dict:
    """:func:`initialise` for a teacher; weights that differ from the model only in the
    classifier's output count fail saying both class counts (a teacher's head cannot be
    re-initialised)."""
    from ..models.weights import match_prefix

    try:
        return initialise(model, path, key, outputs)
    except ConfigError:
        own = model.state_dict()
        state, _ = match_prefix(read_weights(path, key), set(own))
        differ = [k for k in own if k in state and state[k].shape != own[k].shape]
        rows = {state[k].shape[0] for k in differ if state[k].dim()}
        fits = set(own) - set(state) <= {k for k in own if k.endswith("num_batches_tracked")} and \
            not set(state) - set(own) and differ and len(rows) == 1 and \
            all(own[k].dim() and own[k].shape[0] == outputs and own[k].shape[1:] == state[k].shape[1:] for k in differ)
        if fits:
            raise ConfigError(f"{key} {path}: the teacher predicts {rows.pop()} classes and {data} has {outputs}; "
                              "use a teacher trained on this data set") from None
        raise


def load_teacher(cfg: RunConfig, num_classes: int, device: torch.device, data: RunData | None = None,
                 reports: dict | None = None) -> FeatureModel | None:
    """The frozen teacher named by ``cfg.teacher`` (a finished run, or a weights file +
    ``teacher.model``), loaded by ``models/weights.py``; what was loaded goes to
    ``reports["teacher"]``. ``data`` gives the image shape for models adapted by module paths."""
    t = cfg.teacher
    shape = input_shape_of(data.test_set) if data is not None else None
    if t.run:
        run = RunDir(t.run)
        if not run.finished:
            raise ConfigError(f"teacher.run: {t.run} is not a finished run (no result.json); train the teacher first")
        model = build_run_model(run.read_config().model, num_classes, shape, "teacher.model")
        report = teacher_weights(model, t.run, "teacher.run", num_classes, cfg.data.name)
    elif t.checkpoint:
        if t.model is None:
            raise ConfigError("teacher.model: needed with teacher.checkpoint (name the architecture)")
        model = build_run_model(t.model, num_classes, shape, "teacher.model")
        report = teacher_weights(model, t.checkpoint, "teacher.checkpoint", num_classes, cfg.data.name)
    else:
        return None
    if reports is not None:
        reports["teacher"] = report
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _cells(data: RunData, cells: list[tuple[int, int]]) -> str:
    names, groups = data.train_set.class_names, data.train_set.group_names
    shown = ", ".join(f"(class {names[c]!r}, group {groups[g]!r})" for g, c in cells[:12])
    return shown + (f" and {len(cells) - 12} more" if len(cells) > 12 else "")


def check_groups_and_cells(cfg: RunConfig, data: RunData) -> None:
    """Refuse training data whose groups cannot give what the run needs: a group attribute
    with a single value in the training set, and (under the balanced sampler or an MFD term,
    which draw from or average over every (class, group) cell) an empty cell."""
    train = data.train_set
    groups = getattr(train, "groups", None)
    if not isinstance(groups, torch.Tensor) or not len(train):
        return
    attr = next((f"data.options.{k}={cfg.data.options[k]}" for k in ("group", "group_csv", "group_column")
                 if cfg.data.options.get(k)), None)
    present = torch.unique(groups).tolist()
    if len(present) == 1 and (attr or train.num_groups > 1):
        raise ConfigError(f"{attr or f'{cfg.data.name} groups'}: the group attribute has a single value in the training "
                          f"set (every item is in group {train.group_names[present[0]]!r}); group fairness needs two "
                          "groups or more: choose another attribute")
    users = (["data.sampler=balanced"] if cfg.data.sampler == "balanced" else []) + \
        [f"terms.{n}" for n, spec in cfg.terms.items() if spec.get("type", n) == "mfd"]
    if users and data.task.name == "classification" and train.num_groups > 1:
        counts = train.cell_counts()
        empty = [(g, c) for g in range(counts.shape[0]) for c in range(counts.shape[1]) if counts[g, c] == 0]
        if empty:
            raise ConfigError(f"{' and '.join(users)}: needs training items in every (class, group) cell, and "
                              f"{cfg.data.name} has none in {len(empty)}: {_cells(data, empty)}; choose data options "
                              "that leave every cell some items (e.g. data.options.skew below 1.0)")


def _describe(name: str, options: dict) -> str:
    return name + (f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")


def check_run_inputs(cfg: RunConfig, data: RunData, student: nn.Module, teacher: nn.Module | None,
                     device: torch.device) -> None:
    """:func:`check_groups_and_cells`, then one dry forward of the student and the teacher on
    two training items with the evaluation transforms (the random state untouched), so that a
    model built for other images fails naming it (the teacher, not the student)."""
    check_groups_and_cells(cfg, data)
    n = min(len(data.train_set), 2)
    if not n:
        return
    loader = data.task.loader(data.train_set.subset(torch.arange(n)), n, train=False, cfg=cfg, device=device,
                              seed=cfg.seed, rank=0, world_size=1)
    shape = "x".join(str(s) for s in data.train_set.image_shape[1:])
    if cfg.teacher.run:
        t = RunDir(cfg.teacher.run).read_config().model
        who = f"teacher.run {cfg.teacher.run}: {_describe(t.name, t.options)}"
    else:
        who = f"teacher.model {_describe(cfg.teacher.model.name, cfg.teacher.model.options)}" if cfg.teacher.model else "teacher"
    models = [(f"model {_describe(cfg.model.name, cfg.model.options)}", student,
               "set model.options (e.g. image_size) to fit them")]
    if teacher is not None:
        models.append((who, teacher, "use a teacher built for these images"))
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        x = next(iter(loader.epoch(0)))[0]
        for what, model, fix in models:
            mode = model.training
            model.eval()
            try:
                with torch.no_grad():
                    model.forward_features(x)
            except (RuntimeError, ValueError, ConfigError) as e:  # a shape mismatch, or the model's own check
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ConfigError(f"{what} cannot run on {cfg.data.name}'s {shape} images ({first}); it was built for "
                                  f"other images: {fix}") from None
            finally:
                model.train(mode)


class Reiterable:
    """Each iteration runs one fresh pass of ``loader.epoch(0)`` (unaugmented, in order)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader.epoch(0))


def setup_terms(objective: Objective, student: FeatureModel, teacher: FeatureModel | None, data: RunData,
                cfg: RunConfig, device: torch.device) -> None:
    """Size and initialise the term modules from a dry forward of the first training items
    (with the evaluation transforms; with a ``data.crop``, its deterministic form of the same
    output size, ``CropSpec.fixed``, also for ``train_batches``)."""
    if not len(objective.terms):
        return
    train_set, batch_size, task = data.train_set, cfg.data.batch_size, data.task
    n = min(len(train_set), batch_size)
    if cfg.data.crop is not None:  # classification (validated): the training crop's size, deterministic
        fixed = CropSpec.parse(cfg.data.crop, "data.crop").fixed(*train_set.image_shape[1:])
        cfg = replace(cfg, data=replace(cfg.data, eval_crop=fixed.as_dict()))
    settings = dict(train=False, cfg=cfg, device=device, seed=cfg.seed, rank=0, world_size=1)
    probe = task.loader(train_set.subset(torch.arange(n)), n, **settings)
    x, _, _ = next(iter(probe.epoch(0)))
    student.eval()
    with torch.no_grad():
        s_feat = student.forward_features(x)
        t_feat = None
        if teacher is not None:
            teacher.eval()
            t_feat = teacher.forward_features(x)
    student.train()
    train_batches = Reiterable(task.loader(train_set, batch_size, **settings))
    ctx = SetupContext(
        teacher=teacher, student_features=s_feat, teacher_features=t_feat, num_classes=data.num_classes,
        num_groups=data.num_groups, device=device, train_batches=train_batches, terms=dict(objective.terms.items()),
    )
    for term in objective.terms.values():
        term.setup(ctx)
    objective.to(device)


# ----------------------------------------------------------------------------- finished runs


@dataclass
class RunModel:
    """A run's model rebuilt from its folder, with its config, task and test set."""

    cfg: RunConfig
    model: FeatureModel
    task: Task
    test_set: object
    device: torch.device

    def test_loader(self):
        """The run's evaluation loader of its test set, on its device."""
        return self.task.loader(self.test_set, self.cfg.data.eval_batch_size, train=False, cfg=self.cfg,
                                device=self.device, seed=self.cfg.seed, rank=0, world_size=1)


def load_run_model(path: str | Path, device: str | None = None) -> RunModel:
    """Rebuild the model of the run in ``path`` from its config and checkpoint, on ``device``
    (default: the run's), in eval mode, in the run's memory layout (``channels_last``, resolved
    for ``device``), with its test set."""
    run = RunDir(path)
    cfg = run.read_config()
    if device:
        cfg = replace(cfg, device=device)
    dev = resolve_device(cfg.device)
    d = cfg.data
    test = build_dataset(d.name, root=d.root, split="test", seed=cfg.seed, **d.options)
    task = build_task(cfg)
    model = build_run_model(cfg.model, task.num_outputs(test), input_shape_of(test))
    load_state(model, load_weights(run.checkpoint), f"{run.checkpoint}")
    if resolve_channels_last(cfg.channels_last, dev, [model]):  # the layout training evaluated in
        model.to(memory_format=torch.channels_last)
    return RunModel(cfg, model.to(dev).eval(), task, test, dev)
