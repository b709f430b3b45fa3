"""The trainer: stages, optimizers, schedules, checkpoints, resume, progress and metrics.

A run is built entirely before its first step (data, models, teacher, terms), so a bad config
fails early. Every epoch draws its randomness (sampling, augmentation, dropout) from a seed
derived from (seed, epoch), and the checkpoint after each epoch holds everything else, so a
killed run resumed with ``resume=True`` ends with the metrics of an uninterrupted one.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .config import OptimConfig, RunConfig, ScheduleConfig, StageConfig, deep_merge, dump_yaml, from_dict, safe_load, stage_list, to_dict
from .data import BatchLoader, ImageDataset, build_dataset
from .errors import ConfigError, RunDirError, TrainingError
from .distributed import DistContext, all_reduce_sum, barrier
from .distributed import setup as setup_distributed
from .fairness import cell_counts, metrics_from_counts
from .methods.base import SetupContext, TermInput
from .methods.objective import Objective
from .models import FeatureModel, Features, build_model, count_parameters
from .progress import Progress
from .rundir import RunDir, write_json, write_text

# ----------------------------------------------------------------------------- helpers

RESUMABLE = ("progress", "device", "compile", "threads")
"""Config keys that may differ when a run is resumed (e.g. continue a CUDA run on the CPU)."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness, a function of the run's seed and the epoch only."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**31 - 1)


def default_out(cfg: RunConfig) -> str:
    """The run directory when ``out`` is not set: ``runs/<data>/<name>/seed<seed>``."""
    return f"runs/{cfg.data.name}/{cfg.name or 'run'}/seed{cfg.seed}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available here; use device=cpu")
    return torch.device(name)


def set_bn_mode(model: nn.Module, bn_mode: str) -> None:
    """Eval mode everywhere; with ``bn_mode="train"`` BatchNorm layers use batch statistics."""
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_state(model: nn.Module, state: dict, where: str) -> None:
    try:
        model.load_state_dict(strip_prefix(state))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"{where}: weights do not fit the model ({' '.join(first[:3])[:400]})") from None


def read_run_config(run: RunDir) -> RunConfig:
    if not run.config.is_file():
        raise RunDirError(f"{run.path}: not a run directory (no config.yaml)")
    return from_dict(RunConfig, safe_load(run.config.read_text()), key="")


def load_teacher(cfg: RunConfig, num_classes: int, device: torch.device) -> FeatureModel | None:
    """The frozen teacher named by ``cfg.teacher`` (a finished run, or a checkpoint file + model)."""
    t = cfg.teacher
    if t.run:
        run = RunDir(t.run)
        if not run.finished:
            raise ConfigError(f"teacher.run: {t.run} is not a finished run (no result.json); train the teacher first")
        tcfg = read_run_config(run)
        model = build_model(tcfg.model.name, num_classes, key="teacher.model", **tcfg.model.options)
        load_state(model, run.load_checkpoint()["model"], f"teacher.run {t.run}")
    elif t.checkpoint:
        if t.model is None:
            raise ConfigError("teacher.model: needed with teacher.checkpoint (name the architecture)")
        model = build_model(t.model.name, num_classes, key="teacher.model", **t.model.options)
        try:
            state = torch.load(t.checkpoint, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"teacher.checkpoint: {t.checkpoint} does not exist") from None
        except Exception as e:
            raise ConfigError(f"teacher.checkpoint: {t.checkpoint} cannot be loaded safely ({e})") from None
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        load_state(model, state, f"teacher.checkpoint {t.checkpoint}")
    else:
        return None
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def logits_only(logits: torch.Tensor) -> Features:
    return Features(logits=logits, stages=[], embedding=logits)


@dataclass
class Precision:
    """Mixed precision and memory layout of a run (config keys ``amp``, ``channels_last``)."""

    device_type: str = "cpu"
    amp: str = "off"
    channels_last: bool = False
    scaler: object = None

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, num_classes: int, num_groups: int,
             precision: "Precision | None" = None, dist_ctx: DistContext = DistContext()) -> dict:
    """Mean CE loss, accuracy, DEO_A, DEO_M and cell accuracies of ``model`` on ``loader``.

    Under torchrun each process evaluates its share of every batch and the counts are summed.
    """
    precision = precision or Precision()
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros(num_groups, num_classes, dtype=torch.long, device=dev)
    total = torch.zeros_like(correct)
    for x, y, g in loader.epoch(0):
        with precision.autocast():
            logits = model(precision.input(x)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        c, t = cell_counts(logits.argmax(1), y, g, num_classes, num_groups)
        correct += c
        total += t
    model.train(was_training)
    correct, total = all_reduce_sum(correct, dist_ctx), all_reduce_sum(total, dist_ctx)
    loss_sum = all_reduce_sum(loss_sum, dist_ctx)
    out = metrics_from_counts(correct, total)
    out["loss"] = loss_sum.item() / max(int(total.sum()), 1)
    return out


class Reiterable:
    """Each iteration runs one fresh pass of ``loader.epoch(0)`` (unaugmented, in order)."""

    def __init__(self, loader: BatchLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader.epoch(0))


# ----------------------------------------------------------------------------- stage


@dataclass
class Stage:
    """A resolved stage: which terms run, with which optimizers and schedule."""

    cfg: StageConfig
    index: int
    active: list[str]
    optim: OptimConfig
    schedule: ScheduleConfig
    train_student: bool
    trained_terms: list[str]
    needs_features: bool
    needs_teacher: bool
    teacher_grad: bool
    input_grad: bool


def resolve_stage(index: int, sc: StageConfig, cfg: RunConfig, objective: Objective) -> Stage:
    """Which terms run in stage ``sc``, what they need, and its optimizer and schedule settings."""
    active = list(sc.terms) if sc.terms is not None else list(cfg.terms)
    trained = list(sc.train) if sc.train is not None else ["student", *active]
    terms = [objective.term(n) for n in active]
    return Stage(
        cfg=sc, index=index, active=active,
        optim=from_dict(OptimConfig, deep_merge(to_dict(cfg.optim), sc.optim), f"stages[{index}].optim"),
        schedule=from_dict(ScheduleConfig, deep_merge(to_dict(cfg.schedule), sc.schedule), f"stages[{index}].schedule"),
        train_student="student" in trained,
        trained_terms=[n for n in trained if n != "student"],
        needs_features=any(t.needs_features for t in terms),
        needs_teacher=any(t.needs_teacher for t in terms),
        teacher_grad=any(t.teacher_grad for t in terms),
        input_grad=any(t.input_grad for t in terms),
    )


def make_optimizer(params, spec: OptimConfig) -> torch.optim.Optimizer:
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, weight_decay=spec.weight_decay)


def scheduled_lr(spec: ScheduleConfig, base_lr: float, epoch: int, epochs: int) -> float:
    """Learning rate of ``epoch`` (0-based, within the stage) for the stateless schedules."""
    if spec.name == "multistep":
        return base_lr * spec.gamma ** sum(epoch >= m for m in spec.milestones)
    if spec.name == "cosine":
        return spec.min_lr + (base_lr - spec.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    return base_lr


class StudentStep(nn.Module):
    """The student's forward and the objective as one module, so that one DistributedDataParallel
    wrapper covers every trainable part (student, connectors, adversaries); the teacher's
    features come in as an argument."""

    def __init__(self, student: FeatureModel, objective: Objective):
        super().__init__()
        self.student, self.objective = student, objective

    def forward(self, x, y, g, teacher_feat, teacher, stage: Stage, weights: dict, epoch: int):
        student_feat = self.student.forward_features(x) if stage.needs_features else logits_only(self.student(x))
        inp = TermInput(x=x, y=y, g=g, student=student_feat, teacher=teacher_feat,
                        student_model=self.student, teacher_model=teacher, epoch=epoch)
        loss, parts = self.objective(inp, stage.active, stage.cfg.ce_weight, weights)
        return loss, parts, student_feat.logits


def train_step(step: nn.Module, teacher, stage: Stage, optimizers, x, y, g, epoch: int, weights: dict,
               precision: Precision = Precision()) -> dict:
    """One optimisation step: teacher forward (no autograd unless a term needs it), student
    forward and objective (``step``: a :class:`StudentStep`, possibly DDP-wrapped), backward,
    every optimizer steps. Returns the detached loss parts."""
    x = precision.input(x)
    if stage.input_grad:
        x = x.detach().requires_grad_(True)
    teacher_feat = None
    with precision.autocast():
        if stage.needs_teacher:
            with torch.set_grad_enabled(stage.teacher_grad):
                teacher_feat = teacher.forward_features(x) if stage.needs_features else logits_only(teacher(x))
        loss, parts, logits = step(x, y, g, teacher_feat, teacher, stage, weights, epoch)
    if not torch.isfinite(loss):
        bad = [k for k, v in parts.items() if not torch.isfinite(v)] or ["total"]
        raise TrainingError(
            f"loss is {loss.item()} at stage {stage.cfg.name!r}, epoch {epoch + 1} (non-finite part: {', '.join(bad)}). "
            "Lower optim.lr or the term weights."
        )
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if loss.requires_grad:
        scaler = precision.scaler
        if scaler is not None:
            scaler.scale(loss).backward()
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            for opt in optimizers:
                opt.step()
    parts["loss"] = loss.detach()
    parts["correct"] = (logits.argmax(1) == y).sum()
    return parts


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Builds a run from a :class:`RunConfig` and trains it into its run directory.

    ``callbacks`` are called as ``cb(trainer, record)`` after each epoch's checkpoint is
    written (sweeps use them for progress; tests use them to simulate a kill). Under torchrun
    every process builds the same run; only rank 0 writes files.
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, callbacks: list[Callable] = (), log=print):
        self.cfg, self.resume, self.callbacks, self.log = cfg, resume, list(callbacks), log
        self.run_dir = RunDir(cfg.out or default_out(cfg))
        self._check_run_dir()
        resolve_device(cfg.device)
        self.dist, self.device = setup_distributed(cfg.device)
        self.is_main = self.dist.is_main
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self._build_data()
        self.student = build_model(cfg.model.name, self.num_classes, **cfg.model.options).to(self.device)
        self.objective = Objective(cfg.terms).to(self.device)
        self.stages = self._build_stages()
        # a configured teacher is loaded only when a term needs it (a baseline may name one)
        needed = any(st.needs_teacher for st in self.stages)
        self.teacher = load_teacher(cfg, self.num_classes, self.device) if needed else None
        self._check_teacher()
        self._teacher_bn_train = self.teacher is not None and any(
            (s.cfg.teacher_bn_mode or cfg.teacher.bn_mode) == "train" for s in self.stages)
        self._setup_terms()
        self.precision = Precision(self.device.type, cfg.amp, cfg.channels_last)
        if cfg.amp == "fp16":
            self.precision.scaler = torch.amp.GradScaler(self.device.type)
        if cfg.channels_last:
            for m in (self.student, self.teacher, self.objective):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        self.step_module = StudentStep(self.student, self.objective)
        if cfg.compile:
            for m in (self.student, self.teacher):
                if m is not None:
                    m.forward_features = torch.compile(m.forward_features)
                    m.forward = torch.compile(m.forward)

    # -- construction ----------------------------------------------------------

    def _check_run_dir(self) -> None:
        rd = self.run_dir
        if rd.finished:
            raise RunDirError(
                f"{rd.path} already holds a finished run (result.json); it is never overwritten. "
                "Choose another out=DIR, or evaluate it with `fairdistill eval`."
            )
        if rd.started and not self.resume:
            raise RunDirError(f"{rd.path} holds an unfinished run; pass --resume to continue it, or choose another out=DIR")
        if self.resume and rd.config.is_file():
            saved, now = to_dict(read_run_config(rd)), to_dict(self.cfg)
            diff = sorted(k for k in now if k not in RESUMABLE and saved.get(k) != now[k])
            if diff:
                raise RunDirError(f"{rd.path}: cannot resume with a different config (changed: {', '.join(diff)})")

    def _build_data(self) -> None:
        d, cfg, ws = self.cfg.data, self.cfg, self.dist.world_size
        kwargs = dict(root=d.root, seed=cfg.seed, **d.options)
        self.train_set: ImageDataset = build_dataset(d.name, split="train", **kwargs)
        self.test_set: ImageDataset = build_dataset(d.name, split="test", **kwargs)
        self.val_set = build_dataset(d.name, split="val", **kwargs) if d.options.get("val_fraction") else None
        self.num_classes, self.num_groups = self.train_set.num_classes, self.train_set.num_groups
        if len(self.train_set) < d.batch_size and d.drop_last:
            raise ConfigError(
                f"data.batch_size: {d.batch_size} is larger than the training set ({len(self.train_set)} items) "
                "with data.drop_last=true; lower the batch size"
            )
        if d.batch_size % ws:
            raise ConfigError(f"data.batch_size: the global batch {d.batch_size} must divide evenly over {ws} processes")
        shard = dict(device=self.device, rank=self.dist.rank, world_size=ws)
        self.train_loader = BatchLoader(  # batch sizes are per process: the global batch split evenly
            self.train_set, d.batch_size // ws, sampler=d.sampler, drop_last=d.drop_last,
            padding=d.padding, flip=d.flip, seed=cfg.seed, **shard,
        )
        eval_batch = max(d.eval_batch_size // ws, 1)
        self.test_loader = BatchLoader(self.test_set, eval_batch, sampler="sequential", **shard)
        self.val_loader = BatchLoader(self.val_set, eval_batch, sampler="sequential", **shard) if self.val_set else None

    def _build_stages(self) -> list[Stage]:
        return [resolve_stage(i, sc, self.cfg, self.objective) for i, sc in enumerate(stage_list(self.cfg))]

    def _check_teacher(self) -> None:
        for st in self.stages:
            if st.needs_teacher and self.teacher is None:
                who = next(n for n in st.active if self.objective.term(n).needs_teacher)
                raise ConfigError(f"terms.{who}: this term needs a teacher; set teacher.run=RUN_DIR (a finished run)")

    def _setup_terms(self) -> None:
        """Size and initialise term modules from a dry forward of the first training items."""
        if not len(self.objective.terms):
            return
        n = min(len(self.train_set), self.cfg.data.batch_size)
        probe = BatchLoader(self.train_set.subset(torch.arange(n)), n, sampler="sequential", device=self.device)
        x, _, _ = next(iter(probe.epoch(0)))
        self.student.eval()
        with torch.no_grad():
            s_feat = self.student.forward_features(x)
            t_feat = None
            if self.teacher is not None:
                self.teacher.eval()
                t_feat = self.teacher.forward_features(x)
        self.student.train()
        train_batches = Reiterable(BatchLoader(self.train_set, self.cfg.data.batch_size, sampler="sequential", device=self.device))
        ctx = SetupContext(
            student=self.student, teacher=self.teacher, student_features=s_feat, teacher_features=t_feat,
            sample_x=x, num_classes=self.num_classes, num_groups=self.num_groups, device=self.device,
            train_batches=train_batches, terms=dict(self.objective.terms.items()),
        )
        for term in self.objective.terms.values():
            term.setup(ctx)
        self.objective.to(self.device)

    def _prepare_stage(self, stage: Stage):
        """Optimizers, plateau scheduler and the (DDP-wrapped) step module of ``stage``.

        Only what the stage trains requires grad, so DDP synchronises exactly those parameters.
        """
        for p in self.step_module.parameters():
            p.requires_grad_(False)
        main_params = list(self.student.parameters()) if stage.train_student else []
        own = {}
        for name in stage.trained_terms:
            term = self.objective.term(name)
            params = list(term.parameters())
            if not params:
                continue
            if term.optimizer is None:
                main_params += params
            else:
                spec = from_dict(OptimConfig, deep_merge(to_dict(stage.optim), term.optimizer), f"terms.{name}.optimizer")
                own[name] = make_optimizer(params, spec)
                for p in params:
                    p.requires_grad_(True)
        for p in main_params:
            p.requires_grad_(True)
        main = make_optimizer(main_params, stage.optim) if main_params else None
        plateau = None
        if stage.schedule.name == "plateau" and main is not None:
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                main, mode="min", factor=stage.schedule.factor, patience=stage.schedule.patience
            )
        step = self.step_module
        if self.dist.enabled and any(p.requires_grad for p in step.parameters()):
            from torch.nn.parallel import DistributedDataParallel as DDP

            step = DDP(step, find_unused_parameters=True)
        return main, own, plateau, step

    # -- training ----------------------------------------------------------------

    def _train_epoch(self, stage: Stage, step: nn.Module, optimizers: list, epoch: int, global_epoch: int) -> dict:
        torch.manual_seed(epoch_seed(self.cfg.seed, global_epoch))
        self.student.train(stage.train_student)  # a frozen student keeps its BN statistics
        self.objective.train()
        if self.teacher is not None:
            set_bn_mode(self.teacher, stage.cfg.teacher_bn_mode or self.cfg.teacher.bn_mode)
        weights = self.objective.current_weights(stage.active, epoch, stage.cfg.epochs)
        sums: dict[str, torch.Tensor] = {}
        n = 0
        bar = Progress(len(self.train_loader), f"{self.cfg.name or 'run'} {stage.cfg.name} {epoch + 1}/{stage.cfg.epochs}",
                       enabled=self.cfg.progress and self.is_main)
        for x, y, g in self.train_loader.epoch(global_epoch):
            try:
                parts = train_step(step, self.teacher, stage, optimizers, x, y, g, epoch, weights, self.precision)
            except TrainingError as e:
                raise TrainingError(f"{e} {self.run_dir.checkpoint} keeps the last good epoch.") from None
            b = y.numel()
            for k, v in parts.items():
                v = v.double()
                sums[k] = sums.get(k, 0.0) + (v if k == "correct" else v * b)
            n += b
            bar.update(1, f"loss {parts['loss'].item():.4f}")
        keys = sorted(sums)
        totals = all_reduce_sum(torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys]
                                            + [torch.tensor(float(n), dtype=torch.float64, device=self.device)]), self.dist)
        n_all = max(totals[-1].item(), 1.0)
        out = {k: totals[i].item() / n_all for i, k in enumerate(keys)}
        out["accuracy"] = out.pop("correct", 0.0)
        bar.close(f"loss {out.get('loss', float('nan')):.4f} acc {out['accuracy']:.4f}")
        return out

    def _evaluate(self, loader: BatchLoader) -> dict:
        return evaluate(self.student, loader, self.num_classes, self.num_groups, self.precision, self.dist)

    def run(self) -> dict:
        """Train every stage to the end, write ``result.json`` and return it."""
        rd, cfg = self.run_dir, self.cfg
        state = rd.load_checkpoint() if self.resume and rd.checkpoint.is_file() else None
        barrier(self.dist)
        if self.is_main:
            rd.path.mkdir(parents=True, exist_ok=True)
            write_text(rd.config, dump_yaml(cfg))
        history: list[dict] = []
        start_stage = start_epoch = 0
        elapsed0 = 0.0
        if state is not None:
            self.student.load_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
            if self.teacher is not None and state.get("teacher_buffers"):
                self.teacher.load_state_dict({**self.teacher.state_dict(), **state["teacher_buffers"]})
            if self.precision.scaler is not None and state.get("scaler"):
                self.precision.scaler.load_state_dict(state["scaler"])
            history, start_stage, start_epoch = state["history"], state["stage"], state["epoch"]
            elapsed0 = state["elapsed"]
            if self.is_main:
                rd.write_metrics(history)
                self.log(f"resuming {rd.path} at stage {start_stage + 1}, epoch {start_epoch + 1}")
        t0 = time.perf_counter()
        global_epoch = sum(s.cfg.epochs for s in self.stages[:start_stage]) + start_epoch
        for stage in self.stages[start_stage:]:
            main, own, plateau, step = self._prepare_stage(stage)
            optimizers = [o for o in [main, *own.values()] if o is not None]
            first = start_epoch if stage.index == start_stage else 0
            if state is not None and stage.index == start_stage and first > 0:
                if main is not None:
                    main.load_state_dict(state["optim"])
                for name, opt in own.items():
                    opt.load_state_dict(state["term_optim"][name])
                if plateau is not None:
                    plateau.load_state_dict(state["plateau"])
            base_lr = stage.optim.lr
            for epoch in range(first, stage.cfg.epochs):
                if main is not None and stage.schedule.name in ("multistep", "cosine"):
                    for group in main.param_groups:
                        group["lr"] = scheduled_lr(stage.schedule, base_lr, epoch, stage.cfg.epochs)
                train = self._train_epoch(stage, step, optimizers, epoch, global_epoch)
                record = {"stage": stage.cfg.name, "epoch": epoch + 1, "global_epoch": global_epoch + 1,
                          "lr": main.param_groups[0]["lr"] if main else None, "train": train}
                is_last = stage is self.stages[-1] and epoch == stage.cfg.epochs - 1
                needs_test = plateau is not None and stage.schedule.monitor == "test_loss"
                if is_last or needs_test or (global_epoch + 1) % cfg.eval_every == 0:
                    record["test"] = self._evaluate(self.test_loader)
                if self.val_loader is not None:
                    record["val"] = self._evaluate(self.val_loader)
                if plateau is not None:
                    plateau.step(record["test" if stage.schedule.monitor == "test_loss" else "val"]["loss"])
                history.append(record)
                global_epoch += 1
                done_stage, next_epoch = (stage.index + 1, 0) if epoch + 1 == stage.cfg.epochs else (stage.index, epoch + 1)
                if self.is_main:
                    rd.save_checkpoint({
                        "format": 1, "version": __version__, "stage": done_stage, "epoch": next_epoch,
                        "model": self.student.state_dict(), "objective": self.objective.state_dict(),
                        "teacher_buffers": dict(self.teacher.named_buffers()) if self._teacher_bn_train else {},
                        "optim": main.state_dict() if main else {},
                        "term_optim": {k: o.state_dict() for k, o in own.items()},
                        "plateau": plateau.state_dict() if plateau else {},
                        "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else {},
                        "history": history, "elapsed": elapsed0 + time.perf_counter() - t0,
                    })
                    rd.write_metrics(history)
                    self._log_epoch(record)
                barrier(self.dist)
                for cb in self.callbacks:
                    cb(self, record)
        result = self._result(history, elapsed0 + time.perf_counter() - t0)
        if self.is_main:
            write_json(rd.result, result)
        barrier(self.dist)
        return result

    def _log_epoch(self, record: dict) -> None:
        if "test" in record and self.cfg.progress:
            t = record["test"]
            self.log(f"  test: acc {100 * t['accuracy']:.2f}  DEO_A {100 * t['deo_a']:.2f}  DEO_M {100 * t['deo_m']:.2f}  loss {t['loss']:.4f}")

    def _result(self, history: list[dict], wall: float) -> dict:
        evaluated = [r for r in history if "test" in r]
        final = evaluated[-1]["test"] if evaluated else self._evaluate(self.test_loader)
        best = max(evaluated, key=lambda r: r["test"]["accuracy"]) if evaluated else None
        pick = ("accuracy", "deo_a", "deo_m", "loss")
        return {
            "name": self.cfg.name, "method": self.cfg.method, "seed": self.cfg.seed,
            "data": self.cfg.data.name, "model": self.cfg.model.name,
            "teacher": self.cfg.teacher.run or self.cfg.teacher.checkpoint or None,
            "epochs": sum(s.cfg.epochs for s in self.stages),
            "final": {k: final[k] for k in pick},
            "best": ({k: best["test"][k] for k in pick} | {"epoch": best["global_epoch"]}) if best else None,
            "cell_accuracy": final["cell_accuracy"],
            "class_names": self.test_set.class_names, "group_names": self.test_set.group_names,
            "num_params": count_parameters(self.student),
            "world_size": self.dist.world_size,
            "wall_time_s": wall,
        }


def train(cfg: RunConfig, resume: bool = False, **kwargs) -> dict:
    """Train one run (see :class:`Trainer`) and return its ``result.json`` contents."""
    return Trainer(cfg, resume=resume, **kwargs).run()


def evaluate_run(path: str, device: str | None = None) -> dict:
    """Re-evaluate the checkpoint of the run in ``path`` on its test set (nothing is written)."""
    run = RunDir(path)
    cfg = read_run_config(run)
    if device:
        cfg = replace(cfg, device=device)
    dev = resolve_device(cfg.device)
    d = cfg.data
    test = build_dataset(d.name, root=d.root, split="test", seed=cfg.seed, **d.options)
    model = build_model(cfg.model.name, test.num_classes, **cfg.model.options)
    load_state(model, run.load_checkpoint()["model"], f"{run.checkpoint}")
    loader = BatchLoader(test, d.eval_batch_size, sampler="sequential", device=dev)
    out = evaluate(model.to(dev), loader, test.num_classes, test.num_groups, Precision(dev.type, cfg.amp))
    out["class_names"], out["group_names"] = test.class_names, test.group_names
    return out
