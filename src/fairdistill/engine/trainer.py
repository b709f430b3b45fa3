"""The trainer: stages, optimizers, schedules, checkpoints, resume, progress and metrics.

A run is built entirely before its first step (data, models, teacher, terms), so a bad config
fails early. Every epoch draws its randomness (sampling, augmentation, dropout) from a seed
derived from (seed, epoch), and the checkpoint after each epoch holds everything else, so a
killed run resumed with ``resume=True`` ends with the metrics of an uninterrupted one.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from ..config import RunConfig, check_teacher, config_changes, dump_yaml, from_dict, to_dict
from ..distributed import all_reduce_sum, barrier
from ..distributed import setup as setup_distributed
from ..errors import RunDirError, TrainingError
from ..methods.objective import Objective
from ..loggers import RunLoggers, check_loggers, open_loggers
from ..models import count_parameters
from ..predictions import PredictionRecorder, check_task, write_predictions
from ..progress import Progress, RunClock
from ..rundir import RunDir, write_json, write_text
from ..tasks import batch_size_of, task_of
from .build import build_data, build_student, default_out, load_teacher, resolve_device, seed_everything, setup_terms
from .build import check_run_inputs, load_state, resolve_threads
from .checkpoint import config_fingerprint, load_checkpoint, save_checkpoint
from .defaults import resolve_channels_last
from .evaluate import evaluate, evaluations
from .stages import STATELESS, Stage, continue_state, lr_groups, make_optimizer, resolve_stages, scheduled_lr
from .step import Precision, StageRun, StudentStep, train_step
from .teacher_cache import batch_items, check_cache_config, open_teacher_cache


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness, a function of the run's seed and the epoch only."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**31 - 1)


def set_bn_mode(model: nn.Module, bn_mode: str) -> None:
    """Eval mode everywhere; with ``bn_mode="train"`` BatchNorm layers use batch statistics."""
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


class Trainer:
    """Builds a run from a :class:`RunConfig` and trains it into its run directory.

    ``callbacks`` are called as ``cb(trainer, record)`` after each epoch's checkpoint is
    written (sweeps use them for progress; tests use them to simulate a kill). Under torchrun
    every process builds the same run; only rank 0 writes files, logs (``cfg.loggers``) and
    prints. ``started``: the ``time.perf_counter()`` at which the invocation started (the CLI's
    start, imports included; default: this constructor's start); ``result.json``'s
    ``startup_s`` is the time from there to the first training step.
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, callbacks: list[Callable] = (), log=print,
                 started: float | None = None):
        self.started = time.perf_counter() if started is None else started
        self.clock: RunClock | None = None  # the run's steps, set when it starts
        self.cfg, self.resume, self.callbacks, self.log = cfg, resume, list(callbacks), log
        self.run_dir = RunDir(cfg.out or default_out(cfg))
        self._check_run_dir()
        check_teacher(cfg)
        check_cache_config(cfg)
        check_loggers(cfg.loggers)
        if cfg.save_predictions:
            check_task(task_of(cfg.data.name), "save_predictions")
        resolve_device(cfg.device)
        self.dist, self.device = setup_distributed(cfg.device)
        self.is_main = self.dist.is_main
        if self.device.type != "cpu" or cfg.compile:  # CPU kernels are deterministic; the call imports inductor (1.5 s)
            torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
        if cfg.threads:
            torch.set_num_threads(resolve_threads(cfg.threads))
        seed_everything(cfg.seed)
        self.data = build_data(cfg, self.device, self.dist)
        self.task = self.data.task
        self.num_classes, self.num_groups = self.data.num_classes, self.data.num_groups
        outputs = self.task.num_outputs(self.data.train_set)
        self.weights: dict = {}  # what model.weights / the teacher loaded (result.json)
        self.student = build_student(cfg, outputs, self.data, self.device, self.weights)
        self.objective = Objective(cfg.terms, self.task).to(self.device)
        self.stages = resolve_stages(cfg, self.objective)
        self.steps_per_epoch = len(self.data.train_loader)
        for st in self.stages:
            st.fit(self.steps_per_epoch)
        # a configured teacher is loaded only when a term needs it (a baseline may name one)
        needed = any(st.needs_teacher for st in self.stages)
        self.teacher = load_teacher(cfg, outputs, self.device, self.data, self.weights) if needed else None
        check_run_inputs(cfg, self.data, self.student, self.teacher, self.device)
        self._teacher_bn_train = self.teacher is not None and any(
            (s.cfg.teacher_bn_mode or cfg.teacher.bn_mode) == "train" for s in self.stages)
        setup_terms(self.objective, self.student, self.teacher, self.data, cfg, self.device)
        self.channels_last = resolve_channels_last(cfg.channels_last, self.device, [self.student])  # the teacher follows
        self.precision = Precision(self.device.type, cfg.amp, self.channels_last)
        if cfg.amp == "fp16":
            self.precision.scaler = torch.amp.GradScaler(self.device.type)
        if self.channels_last:
            for m in (self.student, self.teacher, self.objective):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        self.step_module = StudentStep(self.student, self.objective)
        if cfg.compile:
            for m in (self.student, self.teacher):
                if m is not None:
                    m.forward_features = torch.compile(m.forward_features)
                    m.forward = torch.compile(m.forward)
        self.teacher_cache = open_teacher_cache(cfg, self.stages, self.objective, self.teacher, self.data,
                                                self.dist.world_size, self.precision, self.device,
                                                log=self.log if self.is_main else lambda *_: None)

    def _check_run_dir(self, locked: bool = False) -> None:
        rd = self.run_dir
        if not locked:  # before anything is built: a folder that cannot be written, or another writer
            rd.check_writable()
            rd.check_no_writer()
        if rd.finished:
            raise RunDirError(
                f"{rd.path} already holds a finished run (result.json); it is never overwritten. "
                "Choose another out=DIR, or evaluate it with `fairdistill eval`."
            )
        if rd.checkpoint.is_file() and not self.resume:  # a run that failed before its first epoch is retried
            raise RunDirError(f"{rd.path} holds an unfinished run; pass --resume to continue it, or choose another out=DIR")
        if self.resume and rd.config.is_file():
            diff = config_changes(rd.read_config(), self.cfg, ignore=("out",))  # a moved or copied run resumes
            if diff:
                raise RunDirError(f"{rd.path}: cannot resume with a different config (changed: {', '.join(diff)})")

    # -- stages ------------------------------------------------------------------

    def _optimizers(self, stage: Stage):
        """``stage``'s main optimizer (the student and the terms trained with it; None when
        empty), the terms' own optimizers by name, and every parameter they train."""
        main_params = [(f"student.{n}", p) for n, p in self.student.named_parameters()] if stage.train_student else []
        own, trained = {}, []
        for name in stage.trained_terms:
            term = self.objective.term(name)
            params = list(term.parameters())
            if not params:
                continue
            if term.optimizer is None:
                main_params += [(f"terms.{name}.{n}", p) for n, p in term.named_parameters()]
            else:
                spec = from_dict(type(stage.optim), {**to_dict(stage.optim), **term.optimizer}, f"terms.{name}.optimizer")
                own[name] = make_optimizer(params, spec)
                trained += params
        groups = lr_groups(main_params, stage.optim.lr_mult, f"stages[{stage.index}].optim.lr_mult")
        main = make_optimizer(groups, stage.optim) if main_params else None
        return main, own, trained + [p for _, p in main_params]

    def _saved_optimizers(self, stage: Stage, state: dict):
        """``stage``'s optimizers as a checkpoint written at its end holds them (for a resumed
        stage that continues them)."""
        main, own, _ = self._optimizers(stage)
        if main is not None and state["optim"]:
            main.load_state_dict(state["optim"])
        for name, opt in own.items():
            if name in state["term_optim"]:
                opt.load_state_dict(state["term_optim"][name])
        return main, own

    def _prepare_stage(self, stage: Stage, previous=None):
        """Optimizers, plateau scheduler and the (DDP-wrapped) step module of ``stage``;
        ``previous`` = the previous stage's (main, own) optimizers, continued when the stage says
        ``optimizer: continue``.

        Only what the stage trains requires grad, so DDP synchronises exactly those parameters.
        """
        for p in self.step_module.parameters():
            p.requires_grad_(False)
        main, own, trained = self._optimizers(stage)
        for p in trained:
            p.requires_grad_(True)
        if stage.cfg.optimizer == "continue" and previous is not None:
            continue_state(main, previous[0])
            for name, opt in own.items():
                continue_state(opt, previous[1].get(name))
        plateau = None
        if stage.schedule.name == "plateau" and main is not None:
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                main, mode="min", factor=stage.schedule.factor, patience=stage.schedule.patience
            )
        module = self.step_module
        if self.dist.enabled and any(p.requires_grad for p in module.parameters()):
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, find_unused_parameters=True)
        optimizers = [o for o in [main, *own.values()] if o is not None]
        cache = self.teacher_cache if self.teacher_cache is not None and stage.index in self.teacher_cache.stages else None
        return main, own, plateau, StageRun(stage, module, optimizers, self.teacher, self.precision, self.task,
                                            teacher_cache=cache)

    def _positions(self, stage: Stage) -> tuple[int, int]:
        """(offset, total) of ``stage``'s schedule in its unit (epochs or iterations): the stage
        alone, or the whole run when the schedule spans it."""
        spec, spe = stage.schedule, self.steps_per_epoch
        size = (lambda s: s.total_steps(spe)) if spec.unit == "iteration" else (lambda s: s.epochs)
        if spec.span == "stage":
            return 0, size(stage)
        return sum(size(s) for s in self.stages[:stage.index]), sum(size(s) for s in self.stages)

    def _set_lr(self, main, stage: Stage, t: int) -> None:
        """Learning rates of the main optimizer at position ``t`` of a stateless schedule."""
        offset, total = self._positions(stage)
        lr = scheduled_lr(stage.schedule, stage.optim.lr, offset + t, total)
        for group in main.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    # -- training ----------------------------------------------------------------

    def _modes(self, stage: Stage) -> None:
        """Train/eval modes of the student, the term modules and the teacher for ``stage``."""
        mode = stage.cfg.student_mode
        self.student.train(stage.train_student if mode == "auto" else mode == "train")  # a frozen student keeps its BN statistics
        self.objective.train()
        if self.teacher is not None:
            set_bn_mode(self.teacher, stage.cfg.teacher_bn_mode or self.cfg.teacher.bn_mode)
            if self.cfg.teacher.dropout:
                for m in self.teacher.modules():
                    if isinstance(m, nn.modules.dropout._DropoutNd):
                        m.train()

    def _train_epoch(self, run: StageRun, main, epoch: int, global_epoch: int) -> dict:
        stage = run.stage
        torch.manual_seed(epoch_seed(self.cfg.seed, global_epoch))
        self._modes(stage)
        run.weights = self.objective.current_weights(stage.active, epoch, stage.epochs)
        per_step = main is not None and stage.schedule.name in STATELESS and stage.schedule.unit == "iteration"
        steps, spe = stage.steps(epoch, self.steps_per_epoch), self.steps_per_epoch
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        n = 0
        bar = Progress(steps, f"{self.cfg.name or 'run'} {stage.cfg.name} {epoch + 1}/{stage.epochs}",
                       enabled=self.cfg.progress and self.is_main, clock=self.clock)
        items = batch_items(self.data.train_loader, global_epoch) if run.teacher_cache is not None else None
        for i, batch in enumerate(self.data.train_loader.epoch(global_epoch)):
            if i == steps:
                break
            if per_step:
                self._set_lr(main, stage, epoch * spe + i)
            try:
                parts, batch_counts = train_step(run, batch, epoch, None if items is None else next(items))
            except TrainingError as e:
                raise TrainingError(f"{e} {self.run_dir.checkpoint} keeps the last good epoch. "
                                    f"{self.run_dir.lower_lr_command(self.cfg, stage.index, stage.optim.lr)}") from None
            b = batch_size_of(batch[1])
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.double() * b
            for k, v in batch_counts.items():
                counts[k] = counts.get(k, 0.0) + v.double()
            n += b
            bar.update(1, f"loss {parts['loss'].item():.4f}", images=b * self.dist.world_size,
                       lr=main.param_groups[0]["lr"] if main is not None else None)
        keys, count_keys = sorted(sums), sorted(counts)
        values = [torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys]
        values += [torch.as_tensor(counts[k], dtype=torch.float64, device=self.device) for k in count_keys]
        totals = all_reduce_sum(torch.stack(values + [torch.tensor(float(n), dtype=torch.float64, device=self.device)]),
                                self.dist).tolist()
        n_all = max(totals[-1], 1.0)
        out = {k: totals[i] / n_all for i, k in enumerate(keys)}
        summed = dict(zip(count_keys, totals[len(keys):-1]))
        if "total" in summed:
            out["accuracy"] = summed["correct"] / max(summed["total"], 1.0)
        acc = f" acc {out['accuracy']:.4f}" if "accuracy" in out else ""
        bar.close(f"loss {out.get('loss', float('nan')):.4f}{acc}")
        return out

    def _evaluate(self, loader, recorder=None) -> dict:
        return evaluate(self.student, loader, self.task, self.num_classes, self.num_groups, self.precision, self.dist,
                        recorder=recorder)

    def _write_predictions(self) -> None:
        """``predictions.csv`` of the final model on the test set (``save_predictions``): one more
        pass, whose predictions are those of the final evaluation (same model, same loader)."""
        recorder = PredictionRecorder()
        self._evaluate(self.data.test_loader, recorder)
        preds = recorder.result(self.dist)
        if self.is_main:
            write_predictions(self.run_dir.path / "predictions.csv", preds, self.data.test_set.class_names)

    def _restore(self, state: dict) -> None:
        """Load the model, term modules, teacher buffers and scaler of a checkpoint."""
        load_state(self.student, state["model"], f"{self.run_dir.checkpoint}")
        self.objective.load_state_dict(state["objective"])
        if self.teacher is not None and state.get("teacher_buffers"):
            self.teacher.load_state_dict({**self.teacher.state_dict(), **state["teacher_buffers"]})
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])

    def _save(self, stage: Stage, epoch: int, main, own: dict, plateau, history: list, elapsed: float) -> None:
        """The checkpoint after ``epoch`` of ``stage`` (where a resumed run continues)."""
        done_stage, next_epoch = (stage.index + 1, 0) if epoch + 1 == stage.epochs else (stage.index, epoch + 1)
        save_checkpoint(self.run_dir.checkpoint, {
            "stage": done_stage, "epoch": next_epoch,
            "model": self.student.state_dict(), "objective": self.objective.state_dict(),
            "teacher_buffers": dict(self.teacher.named_buffers()) if self._teacher_bn_train else {},
            "optim": main.state_dict() if main else {},
            "term_optim": {k: o.state_dict() for k, o in own.items()},
            "plateau": plateau.state_dict() if plateau else {},
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else {},
            "history": history, "elapsed": elapsed,
        }, fingerprint=config_fingerprint(self.cfg))

    def run(self) -> dict:
        """Train every stage to the end, write ``result.json`` and return it, holding the run
        folder's writer lock throughout (rank 0; :class:`~fairdistill.rundir.RunLock`), after
        removing the temporaries of interrupted writes."""
        if not self.is_main:
            return self._run()
        with self.run_dir.lock():
            self._check_run_dir(locked=True)  # again under the lock: another process may have written meanwhile
            removed = self.run_dir.remove_temporaries()
            if removed:
                self.log(f"removed {len(removed)} temporary file(s) of interrupted writes from {self.run_dir.path}")
            return self._run()

    def _run(self) -> dict:
        rd, cfg = self.run_dir, self.cfg
        # resume only from this run's checkpoint (its fingerprint), verified
        state = load_checkpoint(rd.checkpoint, fingerprint=config_fingerprint(cfg))             if self.resume and rd.checkpoint.is_file() else None
        barrier(self.dist)
        if self.is_main:
            rd.path.mkdir(parents=True, exist_ok=True)
            write_text(rd.config, dump_yaml(cfg))
        history: list[dict] = []
        start_stage = start_epoch = 0
        elapsed0 = 0.0
        if state is not None:
            self._restore(state)
            history, start_stage, start_epoch, elapsed0 = state["history"], state["stage"], state["epoch"], state["elapsed"]
            if self.is_main:
                rd.write_metrics(history)
                self.log(f"resuming {rd.path} at stage {start_stage + 1}, epoch {start_epoch + 1}")
        t0 = time.perf_counter()
        self.startup_s = t0 - self.started
        global_epoch = sum(s.epochs for s in self.stages[:start_stage]) + start_epoch
        spe = self.steps_per_epoch
        self.clock = RunClock(sum(s.steps(e, spe) for s in self.stages[start_stage:]
                                  for e in range(start_epoch if s.index == start_stage else 0, s.epochs)))
        loggers = open_loggers(cfg.loggers, rd.path, history, name=f"{cfg.name or 'run'} seed {cfg.seed}",
                               config=to_dict(cfg), config_text=dump_yaml(cfg), log=self.log) \
            if self.is_main else RunLoggers([])
        with loggers:
            result = self._stages(state, history, start_stage, start_epoch, global_epoch, elapsed0, t0, loggers)
        return result

    def _stages(self, state, history, start_stage, start_epoch, global_epoch, elapsed0, t0, loggers) -> dict:
        """The training loop of :meth:`run` from where it starts (or resumes) to ``result.json``."""
        rd, cfg = self.run_dir, self.cfg
        previous = None  # the last stage's (main, own) optimizers
        for stage in self.stages[start_stage:]:
            first = start_epoch if stage.index == start_stage else 0
            if state is not None and stage.index == start_stage and first == 0 and stage.index > 0 \
                    and stage.cfg.optimizer == "continue":
                previous = self._saved_optimizers(self.stages[stage.index - 1], state)
            main, own, plateau, step = self._prepare_stage(stage, previous)
            previous = (main, own)
            if state is not None and stage.index == start_stage and first > 0:
                if main is not None:
                    main.load_state_dict(state["optim"])
                for name, opt in own.items():
                    opt.load_state_dict(state["term_optim"][name])
                if plateau is not None:
                    plateau.load_state_dict(state["plateau"])
            for epoch in range(first, stage.epochs):
                if main is not None and stage.optim.reset_at_milestones and stage.schedule.name == "multistep" \
                        and self._positions(stage)[0] + epoch in stage.schedule.milestones:
                    main.state.clear()  # the official OFD script's new optimizer at each lr drop
                if main is not None and stage.schedule.name in STATELESS and stage.schedule.unit == "epoch":
                    self._set_lr(main, stage, epoch)
                train = self._train_epoch(step, main, epoch, global_epoch)
                record = {"stage": stage.cfg.name, "epoch": epoch + 1, "global_epoch": global_epoch + 1,
                          "lr": main.param_groups[0]["lr"] if main else None, "train": train}
                is_last = stage is self.stages[-1] and epoch == stage.epochs - 1
                test, val = evaluations(cfg.eval_every, global_epoch, is_last,
                                        stage.schedule.monitor if plateau is not None else None, stage.cfg.evaluate)
                if test:
                    record["test"] = self._evaluate(self.data.test_loader)
                if val and self.data.val_loader is not None:
                    record["val"] = self._evaluate(self.data.val_loader)
                if plateau is not None:
                    plateau.step(record["test" if stage.schedule.monitor == "test_loss" else "val"]["loss"])
                history.append(record)
                global_epoch += 1
                if self.is_main:
                    self._save(stage, epoch, main, own, plateau, history, elapsed0 + time.perf_counter() - t0)
                    rd.write_metrics(history)
                    loggers.log(record)
                    self._log_epoch(record)
                barrier(self.dist)
                for cb in self.callbacks:
                    cb(self, record)
        if cfg.save_predictions:
            self._write_predictions()
        result = self._result(history, elapsed0 + time.perf_counter() - t0)
        if self.is_main:
            write_json(rd.result, result)
        barrier(self.dist)
        return result

    def _log_epoch(self, record: dict) -> None:
        if "test" in record and self.cfg.progress:
            self.log(f"  test: {self.task.summary(record['test'])}")

    def _result(self, history: list[dict], wall: float) -> dict:
        evaluated = [r for r in history if "test" in r]
        final = evaluated[-1]["test"] if evaluated else self._evaluate(self.data.test_loader)
        headline = self.task.headline
        best = max(evaluated, key=lambda r: -1.0 if r["test"][headline] != r["test"][headline] else r["test"][headline]) \
            if evaluated else None
        pick = self.task.final_keys
        test_set = self.data.test_set
        return {
            "name": self.cfg.name, "method": self.cfg.method, "seed": self.cfg.seed, "task": self.task.name,
            "data": self.cfg.data.name, "model": self.cfg.model.name,
            "teacher": self.cfg.teacher.run or self.cfg.teacher.checkpoint or None,
            "epochs": sum(s.epochs for s in self.stages),
            "stages": [{"name": s.cfg.name, "epochs": s.epochs} for s in self.stages],
            "final": {k: final[k] for k in pick},
            "best": ({k: best["test"][k] for k in pick} | {"epoch": best["global_epoch"]}) if best else None,
            **{k: final[k] for k in self.task.details if k in final},
            "class_names": test_set.class_names, "group_names": test_set.group_names,
            "num_params": count_parameters(self.student),
            "weights": self.weights,
            "world_size": self.dist.world_size,
            "wall_time_s": wall,
            "startup_s": self.startup_s,
        }


def train(cfg: RunConfig, resume: bool = False, **kwargs) -> dict:
    """Train one run (see :class:`Trainer`) and return its ``result.json`` contents."""
    return Trainer(cfg, resume=resume, **kwargs).run()
