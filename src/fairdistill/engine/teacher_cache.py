"""Cached teacher outputs (config ``teacher.cache``): the frozen teacher's features computed once
per training item and view, then served in the step instead of a teacher forward.

A teacher in eval mode (BatchNorm running statistics, no dropout) fed inputs whose only random
augmentation is the horizontal flip computes the same outputs for an item every epoch, so for
every item the cache holds its plain view and, with ``data.flip``, its mirrored one: exactly the
fields the terms of the served stages read (their ``Term.teacher_fields()``, e.g. only the logits
for HKD, only the embedding for MFD). Served values equal computed ones bit for bit: the cache
is built by the training loader's own pipeline (``BatchLoader.epoch`` with a fixed order and the
flips set) at the training batch size (the last chunk padded to it), in the run's memory layout,
and a CPU convolution or matrix product gives a row the same value whatever the other rows of
its batch and its position among them (measured for the MFD CNN, WRNs and ResNet-18, NCHW and
channels-last, 1 and 2 threads); a 1-row batch, which takes another matrix-product path, runs
the teacher. ``tests/test_teacher_cache.py`` asserts equal values and equal result.json metrics.

Where it is not exact the teacher runs: a stage with the teacher's BN in train mode (OFD, AB's
initialisation), teacher dropout, a gradient through the teacher or the input (Jacobian),
random crops or padding (every epoch another view), mixed precision, torch.compile, several
processes, a non-classification loader, a term that does not declare its teacher fields.
``teacher.cache``: ``auto`` (default) caches on the CPU where exact and where it saves teacher
forwards (the run serves more rows than the build computes, or a stored cache fits) and the
cache takes at most a quarter of the memory; ``on`` caches wherever exact and refuses, naming
the reason, elsewhere (also on CUDA, with ``deterministic: true``); ``off`` never.

Store: with ``teacher.run``, ``<run>/teacher_cache/<key>/``: ``key.json`` (what the key hashes:
the teacher's state tensors and architecture, the training images' bytes, the data set's name,
options, normalisation and crop, the views, batch size, layout, dtype, device, threads, CPU
capability, torch and fairdistill versions) and one ``<field>.npy`` per field, shape (views,
items, ...), written atomically and read memory-mapped without pickle; other runs of the same
teacher, data and settings reuse it (its first batch is recomputed and compared bit for bit
first, else it is rebuilt). Where the folder cannot be written, and with ``teacher.checkpoint``,
the cache lives in memory for the run.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import RunConfig, to_dict
from ..data.augment import CropSpec
from ..data.loader import BatchLoader
from ..errors import ConfigError, RunDirError
from ..methods.fields import DeclaredFeatures, field_value
from ..methods.objective import Objective
from ..models import Features, FeatureModel
from ..rundir import RunDir, atomic_write
from .stages import Stage

__all__ = ["TeacherCache", "batch_items", "build_teacher_cache", "check_cache_config", "config_refusals", "open_teacher_cache",
           "stage_refusal"]

CACHE_DIR = "teacher_cache"
FORMAT = 1
AUTO_MEMORY_SHARE = 0.25
"""``auto`` caches at most this share of the machine's physical memory."""
NOT_CACHED = "but the teacher cache does not hold it"


def cache_mode(cfg: RunConfig) -> str:
    """``teacher.cache`` as "auto", "on" or "off" (YAML reads an unquoted on/off as a bool)."""
    value = cfg.teacher.cache
    return ("on" if value else "off") if isinstance(value, bool) else value


def config_refusals(cfg: RunConfig) -> list[str]:
    """Why ``cfg`` alone rules out an exact cache (before any data or model is built)."""
    d, out = cfg.data, []
    if d.padding:
        out.append(f"data.padding={d.padding} (a random crop of the padded image: every epoch another view)")
    crop = CropSpec.parse(d.crop, "data.crop")
    if crop.is_random:
        out.append(f"data.crop {crop.kind} (random crops: every epoch another view)")
    if cfg.teacher.dropout:
        out.append("teacher.dropout=true (random teacher outputs)")
    if cfg.amp != "off":
        out.append(f"amp={cfg.amp} (mixed precision)")
    if cfg.compile:
        out.append("compile=true (compiled kernels are not checked to match per batch)")
    if cfg.device.startswith("cuda") and not cfg.deterministic:
        out.append("deterministic=false on CUDA (kernels may differ from call to call)")
    return out


def check_cache_config(cfg: RunConfig) -> None:
    """With ``teacher.cache: on``, refuse a config that rules out an exact cache by itself."""
    reasons = config_refusals(cfg) if cache_mode(cfg) == "on" else []
    if reasons:
        raise ConfigError(f"teacher.cache: on, but the teacher's outputs cannot be served exactly: {'; '.join(reasons)}. "
                          "Set teacher.cache to auto (cache where exact) or off.")


def stage_refusal(cfg: RunConfig, stage: Stage, objective: Objective) -> str | None:
    """Why ``stage`` (which needs the teacher) cannot be served from a cache, or None."""
    name = f"stages[{stage.index}] ({stage.cfg.name})"
    if (stage.cfg.teacher_bn_mode or cfg.teacher.bn_mode) == "train":
        return f"{name} runs the teacher's BatchNorm in train mode (batch statistics)"
    if stage.teacher_grad or stage.input_grad:
        return f"{name} takes gradients through the teacher or the input"
    for t in stage.active:
        if objective.term(t).needs_teacher and objective.term(t).teacher_fields() is None:
            return f"terms.{t} ({type(objective.term(t)).__name__}) does not declare the teacher fields it reads"
    return None


def batch_items(loader: BatchLoader, epoch: int):
    """Per batch of ``loader.epoch(epoch)``, the dataset indices of its rows and their flips
    (the loader's own ``indices``, ``global_batches`` and ``rows``)."""
    order, _, flips = loader.indices(epoch)
    for start, stop in loader.global_batches():
        rows = loader.rows(start, stop)
        yield order[rows], flips[rows]


def _digest(*chunks) -> str:
    h = hashlib.blake2b(digest_size=20)
    for c in chunks:
        h.update(c if isinstance(c, bytes) else str(c).encode())
    return h.hexdigest()


def tensor_digest(tensors: dict) -> str:
    """A digest of named tensors (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 8 << 30


@dataclass
class _Field:
    """One cached field: values (views * items, ...) and the memory format a batch gets."""

    values: torch.Tensor
    channels_last: bool


class TeacherCache:
    """The cached fields of one run (build with :func:`open_teacher_cache`); ``stages``: the
    indices of the stages served from it."""

    def __init__(self, fields: dict[str, _Field], structure: Features, num_items: int, views: int,
                 labels: torch.Tensor, stages: set[int], where: str):
        self.fields, self.structure, self.num_items, self.views = fields, structure, num_items, views
        self.labels, self.stages, self.where = labels, stages, where

    @property
    def nbytes(self) -> int:
        return sum(f.values.numel() * f.values.element_size() for f in self.fields.values())

    def features(self, items: torch.Tensor, flips: torch.Tensor, y: torch.Tensor | None = None) -> DeclaredFeatures:
        """The teacher's features of the rows (dataset ``items``, mirrored where ``flips``), as
        a view that lets only the cached fields be read. ``y``: the batch's labels, checked
        against the items' (a loader out of step with :func:`batch_items` fails loudly)."""
        dev = self.labels.device
        items = items.to(dev)
        if y is not None and not torch.equal(self.labels[items], y):
            raise RuntimeError("teacher cache: the batch's labels are not those of the items it was asked for; "
                               "the loader's batches and batch_items() disagree")
        rows = items + flips.to(dev).long() * self.num_items if self.views == 2 else items
        got = {}
        for name, f in self.fields.items():
            v = f.values.index_select(0, rows)
            got[name] = v.contiguous(memory_format=torch.channels_last) if f.channels_last else v
        s = self.structure
        stages = [got.get(f"stages.{i}") for i in range(len(s.stages))]
        extra = {k: [got.get(f"extra.{k}.{i}") for i in range(len(v))] if isinstance(v, (list, tuple))
                 else got.get(f"extra.{k}") for k, v in s.extra.items()}
        feats = Features(logits=got.get("logits"), stages=stages, embedding=got.get("embedding"), extra=extra)
        return DeclaredFeatures(feats, self.fields, NOT_CACHED)


# ----------------------------------------------------------------------------- building


def _view_loader(loader: BatchLoader, views: list[bool]) -> BatchLoader:
    """``loader``'s pipeline over every item in order, once per view (plain, then mirrored),
    at its batch size: the last chunk of each view is padded with the first items."""
    n, b = len(loader.dataset), loader.batch_size
    padded = -(-n // b) * b
    order = torch.cat([torch.arange(padded) % n for _ in views])
    flips = torch.cat([torch.full((padded,), f, dtype=torch.bool) for f in views])
    _, params, _ = loader.indices(0)
    if not bool((params == params[:1]).all()):
        raise ValueError("teacher cache: the loader's augmentation draws vary (only flips may)")
    params = params[:1].expand(order.numel(), *params.shape[1:]).clone()
    view = copy.copy(loader)
    view.indices = lambda epoch: (order, params, flips)
    view.global_batches = lambda: [(s, s + b) for s in range(0, order.numel(), b)]
    view.rows = lambda start, stop: slice(start, stop)
    view.padded = padded
    return view


def _teacher_outputs(teacher: FeatureModel, x: torch.Tensor, precision, features: bool):
    from .step import forward

    with torch.no_grad(), precision.autocast():
        return forward(teacher, precision.input(x), features)


def _structure(feats) -> Features:
    """The list lengths of ``feats`` (stages, extra lists), without tensors."""
    try:
        stages, extra = [None] * len(feats.stages), feats.extra
    except Exception:  # OutputsOnly: logits only
        return Features(logits=None, stages=[], embedding=None, extra={})
    return Features(logits=None, stages=stages, embedding=None,
                    extra={k: [None] * len(v) if isinstance(v, (list, tuple)) else None for k, v in extra.items()})


class _Store:
    """The folder of one key (or none: memory only)."""

    def __init__(self, folder: Path | None, key: dict, log):
        self.folder, self.key, self.log = folder, key, log

    def load(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
        if self.folder is None:
            return None
        path = self.folder / f"{name}.npy"
        try:
            if json.loads((self.folder / "key.json").read_text()) != self.key or not path.is_file():
                return None
            arr = np.load(path, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if tuple(arr.shape) != shape or str(torch.from_numpy(arr[:0]).dtype) != str(dtype):
            return None
        return torch.from_numpy(arr)

    def save(self, name: str, values: torch.Tensor) -> None:
        if self.folder is None:
            return
        try:
            atomic_write(self.folder / "key.json", lambda f: f.write(json.dumps(self.key, indent=1).encode()))
            arr = values.numpy()
            atomic_write(self.folder / f"{name}.npy", lambda f: np.save(f, arr, allow_pickle=False))
        except (RunDirError, OSError) as e:
            self.log(f"teacher cache: cannot store {name} in {self.folder} ({e}); keeping it in memory")
            self.folder = None


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _key(cfg: RunConfig, teacher: FeatureModel, loader: BatchLoader, views: list[bool], dtype, device,
         channels_last: bool = False) -> dict:
    """What the cache's values depend on (module docstring), as plain data; ``channels_last``:
    the run's resolved memory layout."""
    t = cfg.teacher
    model = RunDir(t.run).read_config().model if t.run else t.model
    ds = loader.dataset
    return {
        "format": FORMAT,
        "teacher": {"state": tensor_digest(teacher.state_dict()), "model": to_dict(model)},
        "data": {"name": cfg.data.name, "options": cfg.data.options, "images": tensor_digest({"images": ds.images}),
                 "mean": list(ds.mean or []), "std": list(ds.std or []), "crop": loader.crop.as_dict()},
        "views": ["flip" if f else "plain" for f in views], "batch_size": loader.batch_size,
        "channels_last": bool(channels_last), "dtype": str(dtype), "device": device.type,
        "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "fairdistill": __version__,
    }


def open_teacher_cache(cfg: RunConfig, stages: list[Stage], objective: Objective, teacher: FeatureModel | None,
                       data, world_size: int, precision, device: torch.device, log=print) -> TeacherCache | None:
    """The run's teacher cache per ``cfg.teacher.cache`` (module docstring), or None when the
    teacher runs in every step; ``on`` where it cannot be exact raises a ConfigError naming why.
    Built (or read from the teacher's run folder) before the first step; the random state is
    left as it was."""
    mode = cache_mode(cfg)
    wanting = [s for s in stages if s.needs_teacher]
    if mode == "off" or teacher is None or not wanting:
        return None
    loader = data.train_loader
    reasons = config_refusals(cfg)
    if world_size > 1:
        reasons.append(f"{world_size} processes (the cache serves one process)")
    if data.task.name != "classification" or not isinstance(loader, BatchLoader):
        reasons.append(f"{data.task.name} data (the cache serves the classification loader)")
    refused = {s.index: stage_refusal(cfg, s, objective) for s in wanting}
    served = [s for s in wanting if refused[s.index] is None]
    if mode == "on" and (reasons or len(served) < len(wanting)):
        why = reasons + [r for r in refused.values() if r]
        raise ConfigError(f"teacher.cache: on, but the teacher's outputs cannot be served exactly: {'; '.join(why)}. "
                          "Set teacher.cache to auto (cache where exact) or off.")
    if reasons or not served or (mode == "auto" and device.type != "cpu"):
        return None
    fields = sorted({f for s in served for t in s.active for f in (objective.term(t).teacher_fields() or ())})
    if not fields:
        return None
    views = [False, True] if loader.flip else [False]
    with torch.random.fork_rng(devices=[]):
        return _open(cfg, served, fields, teacher, loader, views, precision, device, mode, log)


class _Build:
    """The build pass of a cache: ``loader``'s items in order, once per view, at its batch
    size; its first batch (the probe) is computed on construction."""

    def __init__(self, teacher: FeatureModel, loader: BatchLoader, views: list[bool], fields: list[str], precision,
                 features: bool):
        teacher.eval()
        self.teacher, self.precision, self.features, self.fields = teacher, precision, features, fields
        self.view = _view_loader(loader, views)
        self.n, self.v, self.b = len(loader.dataset), len(views), loader.batch_size
        self.labels = loader.labels
        self.batches = self.view.epoch(0)
        self.probe = _teacher_outputs(teacher, next(self.batches)[0], precision, features)
        self.first = {name: field_value(self.probe, name).detach() for name in fields}
        self.dtype = next(iter(self.first.values())).dtype
        self.shapes = {name: (self.v * self.n, *t.shape[1:]) for name, t in self.first.items()}
        self.nbytes = sum(int(np.prod(s)) * self.first[k].element_size() for k, s in self.shapes.items())

    @property
    def rows(self) -> int:
        """Teacher rows the build computes."""
        return self.v * self.view.padded

    def matches(self, name: str, stored: torch.Tensor) -> bool:
        """Whether ``stored`` (views, items, ...) holds the probe's rows of field ``name``."""
        k = min(self.b, self.n)
        return torch.equal(stored[0, :k], self.first[name][:k])

    def compute(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Fields ``names`` of every item and view, (views * items, ...) on the CPU."""
        built = {name: torch.empty(self.shapes[name], dtype=self.dtype) for name in names}
        padded = self.view.padded
        for k, pos in enumerate(range(0, self.rows, self.b)):
            out = self.probe if k == 0 else _teacher_outputs(self.teacher, next(self.batches)[0], self.precision,
                                                             self.features)
            p = torch.arange(pos, pos + self.b)
            keep = p % padded < self.n
            rows = (p // padded) * self.n + p % padded
            for name in names:
                built[name][rows[keep]] = field_value(out, name).detach()[keep].cpu()
        return built

    def cache(self, values: dict, device, stages: set[int], where: str) -> TeacherCache:
        fields = {name: _Field(values[name].reshape(self.shapes[name]).to(device), _channels_last(self.first[name]))
                  for name in self.fields}
        return TeacherCache(fields, _structure(self.probe), self.n, self.v, self.labels.to(device), stages, where)


def build_teacher_cache(teacher: FeatureModel, loader: BatchLoader, fields: list[str], precision,
                        features: bool = True, stages: set[int] = frozenset({0})) -> TeacherCache:
    """A cache in memory of ``fields`` for every item of ``loader`` (both views with its flips),
    on the loader's device, serving ``stages``; ``features``: computed by ``forward_features``
    (else by the model's forward: logits only). The random state is left as it was."""
    views = [False, True] if loader.flip else [False]
    with torch.random.fork_rng(devices=[]):
        build = _Build(teacher, loader, views, list(fields), precision, features)
        return build.cache(build.compute(list(fields)), loader.device, set(stages), "memory")


def _open(cfg, served, fields, teacher, loader, views, precision, device, mode, log) -> TeacherCache | None:
    import time

    start = time.perf_counter()
    build = _Build(teacher, loader, views, fields, precision, any(s.needs_features for s in served))
    if mode == "auto" and build.nbytes > AUTO_MEMORY_SHARE * _physical_memory():
        log(f"teacher cache: off ({build.nbytes / 2**30:.1f} GiB of teacher outputs is more than "
            f"{AUTO_MEMORY_SHARE:.0%} of the memory); teacher.cache=on caches anyway")
        return None
    key = _key(cfg, teacher, loader, views, build.dtype, device, precision.channels_last)
    folder = Path(cfg.teacher.run) / CACHE_DIR / _digest(json.dumps(key, sort_keys=True))[:20] if cfg.teacher.run else None
    store = _Store(folder, key, log)
    values = {}
    for name in fields:
        stored = store.load(name, (build.v, build.n, *build.shapes[name][1:]), build.dtype)
        if stored is not None and build.matches(name, stored):
            values[name] = stored
    missing = [name for name in fields if name not in values]
    if missing and mode == "auto":
        served_rows = sum(s.total_steps(len(loader)) for s in served) * build.b
        if served_rows <= build.rows:
            log(f"teacher cache: off (building it would take {build.rows} teacher rows, the run serves {served_rows})")
            return None
    if missing:
        built = build.compute(missing)
        for name in missing:
            store.save(name, built[name].view(build.v, build.n, *build.shapes[name][1:]))
        values.update(built)
    where = str(store.folder) if store.folder is not None else "memory"
    cache = build.cache(values, device, {s.index for s in served}, where)
    how = f"built in {time.perf_counter() - start:.1f} s" if missing else "read"
    log(f"teacher cache: {', '.join(fields)} of {build.n} items x {build.v} view(s), {cache.nbytes / 2**20:.1f} MiB, "
        f"{how} ({where}); stages {', '.join(s.cfg.name for s in served)} run no teacher forward")
    return cache
