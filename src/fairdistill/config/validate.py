"""One validation pass over a whole run config, before any data is read or model built.

Types, choices and bounds were checked while parsing (:mod:`.schema`); this pass checks what
needs the registries or spans keys: the data set, model and term names and every option by the
builder's or term class's signature and annotations, term weights, stages (their terms, what
they train, their optimizer and schedule overrides) and the schedule's monitor. A typo in a
term option (``terms.kd.TT=3``) is reported here, before a missing data folder would be.
"""
from __future__ import annotations

from ..data import DATASETS
from ..data.augment import CropSpec
from ..errors import ConfigError
from ..methods import TERMS
from ..methods.objective import RESERVED, build_terms
from ..models import check_model_options
from ..models.base import NUM_CLASSES
from ..registry import check_number, check_options, suggest
from ..tasks import TASKS, task_of
from .schema import RunConfig, stage_list, stage_optim, stage_schedule

DATA_RESERVED = {
    "root": "data.root",
    "split": "data.options.val_fraction for a validation split (the run builds its train and test splits itself)",
    "seed": "the top-level key seed",
}
"""Builder arguments that the run sets: refused in ``data.options``, with the key to use instead."""
MODEL_RESERVED = NUM_CLASSES


def check_device(device: str) -> None:
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"device: expected cpu, cuda or cuda:N, got {device!r}")


def validate(cfg: RunConfig) -> None:
    """Check ``cfg`` as a whole (see the module docstring); options are stored back coerced."""
    check_device(cfg.device)
    if cfg.amp == "fp16" and cfg.device == "cpu":
        raise ConfigError("amp: fp16 has no fast kernels on the CPU (many times slower than amp=off); use amp=bf16 "
                          "or amp=off there, or device=cuda")
    builder = DATASETS.get(cfg.data.name, key="data.name")
    cfg.data.options = check_options(builder, cfg.data.options, "data.options", reserved=DATA_RESERVED)
    task = task_of(cfg.data.name)
    cfg.task = check_options(TASKS.get(task).__init__, cfg.task, "task")
    if cfg.data.augment and task == "classification":
        raise ConfigError(f"data.augment: {cfg.data.name} is a classification data set; its augmentation is "
                          "data.padding and data.flip (data.augment is for segmentation and detection)")
    check_crops(cfg.data, task)
    for key, model in (("model", cfg.model), ("teacher.model", cfg.teacher.model)):
        if model is not None:
            model.options = check_model_options(model.name, model.options, key)
    if cfg.teacher.model is not None and cfg.teacher.model.weights:
        raise ConfigError("teacher.model.weights: the teacher's weights come from teacher.checkpoint=FILE "
                          "(or teacher.run=RUN_DIR), with teacher.model naming its architecture")
    for name, spec in cfg.terms.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"terms.{name}: expected a mapping of term options, got {spec!r}")
        cls = TERMS.get(spec.get("type", name), key=f"terms.{name}.type")
        if task not in cls.tasks:
            raise ConfigError(f"terms.{name}: {cls.type_name} works on {' and '.join(cls.tasks)} data, and "
                              f"{cfg.data.name} is {task} data")
        options = check_options(cls.__init__, {k: v for k, v in spec.items() if k not in RESERVED}, f"terms.{name}")
        for k in ("weight", "weight_end"):
            if spec.get(k) is not None:
                spec[k] = check_number(spec[k], f"terms.{name}.{k}")
        cfg.terms[name] = {**{k: v for k, v in spec.items() if k in RESERVED}, **options}
    build_terms(cfg.terms)  # the terms' own checks of their option values
    for i, st in enumerate(stage_list(cfg)):
        if st.iterations is not None and (cfg.stages[i].epochs is not None or st.epochs_scale is not None):
            raise ConfigError(f"stages[{i}]: give iterations or epochs (or epochs_scale), not both")
        for t in st.terms or []:
            if t not in cfg.terms:
                raise ConfigError(f"stages[{i}].terms: no term named {t!r}.{suggest(t, cfg.terms)} "
                                  f"Terms: {', '.join(cfg.terms) or 'none'}.")
        for t in st.train or []:
            if t != "student" and t not in cfg.terms:
                raise ConfigError(f"stages[{i}].train: {t!r} is neither 'student' nor a term name.")
        stage_optim(cfg, i, st)
        schedule = stage_schedule(cfg, i, st)
        if schedule.name == "plateau" and schedule.monitor == "val_loss" and not cfg.data.options.get("val_fraction"):
            raise ConfigError("schedule.monitor: val_loss needs a validation split: set data.options.val_fraction (e.g. 0.1)")
        if schedule.name == "plateau" and schedule.unit == "iteration":
            raise ConfigError("schedule.unit: the plateau schedule steps once per epoch on a test or validation loss; "
                              "use unit: epoch")
        check_stage_protocol(cfg, i, st, schedule)


def check_stage_protocol(cfg: RunConfig, i: int, st, schedule) -> None:
    """``optim.reset_at_milestones``, ``stages[i].optimizer`` and ``stages[i].evaluate`` fit
    the stage's schedule and the previous stage."""
    optim = stage_optim(cfg, i, st)
    # with schedule none there is no milestone and nothing to reset (e.g. a pre-stage)
    if optim.reset_at_milestones and schedule.name != "none" and not (schedule.name == "multistep"
                                                                      and schedule.unit == "epoch"):
        key = f"stages[{i}].optim" if st.optim.get("reset_at_milestones") else "optim"
        raise ConfigError(f"{key}.reset_at_milestones: needs a multistep schedule in epochs (the optimizer "
                          f"restarts at its milestones), got schedule {schedule.name!r} in {schedule.unit}s")
    if st.optimizer == "continue":
        if i == 0:
            raise ConfigError("stages[0].optimizer: continue needs a previous stage; use new")
        before = stage_optim(cfg, i - 1, stage_list(cfg)[i - 1]).name
        if before != optim.name:
            raise ConfigError(f"stages[{i}].optimizer: continue needs the previous stage's optimizer ({before}), "
                              f"got optim.name {optim.name}")
    if not st.evaluate and schedule.name == "plateau":
        raise ConfigError(f"stages[{i}].evaluate: false leaves the plateau schedule without its {schedule.monitor}; "
                          "set the stage's schedule (e.g. {name: none}) or evaluate: true")


def check_crops(d, task: str) -> None:
    """``data.crop`` / ``data.eval_crop`` parse as crops (the evaluation one deterministic), take
    ``data.padding`` only with kind ``random``, and belong to classification data (sizes against
    the images are checked when the loaders are built)."""
    crop = CropSpec.parse(d.crop, "data.crop")
    eval_crop = CropSpec.parse(d.eval_crop, "data.eval_crop", deterministic=True)
    for key, spec in (("data.crop", crop), ("data.eval_crop", eval_crop)):
        if spec.kind != "none" and task != "classification":
            raise ConfigError(f"{key}: {d.name} is {task} data, whose crops are set in data.augment")
    if d.padding and crop.kind not in ("none", "random"):
        raise ConfigError(f"data.crop: kind {crop.kind!r} takes no padding (data.padding={d.padding}); "
                          "set data.padding to 0 or use kind random")


def needs_teacher(cfg: RunConfig) -> list[str]:
    """Names of the configured terms that need a teacher model."""
    return [name for name, spec in cfg.terms.items() if TERMS.get(spec.get("type", name)).needs_teacher]


def check_teacher(cfg: RunConfig) -> None:
    """Fail when a term needs a teacher and the config names none (checked when a run starts:
    a config may leave ``teacher.run`` to the command line)."""
    who = needs_teacher(cfg)
    if who and not (cfg.teacher.run or cfg.teacher.checkpoint):
        raise ConfigError(f"terms.{who[0]}: this term needs a teacher; set teacher.run=RUN_DIR (a finished run) "
                          "or teacher.checkpoint=FILE with teacher.model")
