"""The typed run configuration: one dataclass per section, every value checked by annotation.

Types, choices (``Literal``) and bounds (``Annotated[..., Range(...)]``) are checked while a
mapping is parsed (:func:`fairdistill.registry.from_dict`), so an unknown key, a wrong type or
an out-of-range value raises a ConfigError naming the key, the expected type and the nearest
valid key. Checks that need the registries or span keys are in :mod:`.validate`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

from ..registry import Range, from_dict

__all__ = ["DataConfig", "FeaturesConfig", "ModelConfig", "OptimConfig", "RESUMABLE", "RunConfig", "ScheduleConfig", "StageConfig",
           "TeacherConfig", "config_changes", "from_dict", "non_default", "stage_list", "stage_optim", "stage_schedule", "to_dict"]

NonNegInt = Annotated[int, Range(ge=0)]
PosInt = Annotated[int, Range(ge=1)]


@dataclass
class DataConfig:
    """Data set and batch pipeline."""

    name: str = "digits-s"  #: data set name (``fairdistill.data.DATASETS``)
    root: str = "data"  #: folder holding the data set's standard on-disk layout
    options: dict = field(default_factory=dict)  #: data-set specific options (skew, val_fraction...)
    batch_size: PosInt = 128  #: training batch size (global, over all processes)
    eval_batch_size: PosInt = 512  #: evaluation batch size
    sampler: Literal["uniform", "balanced"] = "uniform"  #: balanced oversamples (group, label) cells (MFD's SS)
    drop_last: bool = True  #: drop the last incomplete training batch
    padding: NonNegInt = 0  #: reflect-pad then random-crop augmentation (0: off)
    flip: bool = False  #: random horizontal flip augmentation
    #: training crop (data/augment.py CropSpec): e.g. "random:176", "random_resized:224",
    #: {kind: random_resized, size: 176, scale: [0.08, 1]}; null = none
    crop: Union[str, dict, None] = None
    #: evaluation crop of the test/val loaders: null, "center:S" or "resize:S" (deterministic)
    eval_crop: Union[str, dict, None] = None
    augment: dict = field(default_factory=dict)  #: dense tasks: joint image/target transforms (data/dense_augment.py)


@dataclass
class FeaturesConfig:
    """Feature positions of a model by module path (``fairdistill.models.external.adapt``).

    ``stages``: capture points of the stage features, shallow to deep (``PATH`` or
    ``PATH:input``; None: timm's ``feature_info`` or a ResNet's ``layer1..layer4``);
    ``embedding``: the penultimate embedding's point (None: the classifier's input);
    ``bns``: per stage the BatchNorm for OFD margins, or null (None: the one ``prerelu`` finds,
    or the stage module when it is a BatchNorm); ``prerelu``: resolve each stage to its exact
    pre-activation (a stage module's output is otherwise taken as it is, cloned so that an
    in-place ReLU after it cannot overwrite it).
    """

    stages: Union[list[str], None] = None
    embedding: Union[str, None] = None
    bns: Union[list[Union[str, None]], None] = None
    prerelu: bool = True


@dataclass
class ModelConfig:
    """A model: a zoo name (``fairdistill.models.MODELS``, plugins' included) or an import path
    (``package.module:factory``, ``torchvision:NAME``, ``timm:NAME``), its options, its feature
    positions and the weights it starts from (``fairdistill.models.weights``)."""

    name: str = "mfd-cnn"
    options: dict = field(default_factory=dict)
    features: Union[FeaturesConfig, None] = None  #: feature positions by module path (None: the model's own)
    weights: str = ""  #: initial weights: a state dict, checkpoint or .safetensors file, or a finished run folder
    weights_head: Literal["refuse", "reinit"] = "refuse"  #: a head of another shape: refuse, or drop and re-initialise


@dataclass
class TeacherConfig:
    """Where the teacher comes from and how it runs.

    ``run`` names a finished run directory (its config gives the architecture and its
    checkpoint the weights). Alternatively ``checkpoint`` names a state-dict file and ``model``
    the architecture. ``bn_mode``: ``eval`` (running statistics) or ``train`` (batch statistics,
    as the official OFD code). ``cache``: serve the teacher's outputs from a cache built once
    (``engine/teacher_cache.py``; the same values bit for bit): ``auto`` where exact and
    worthwhile on the CPU, ``on`` (YAML's ``true``) wherever exact (refused, saying why, where
    not), ``off`` (``false``).
    """

    run: str = ""
    checkpoint: str = ""
    model: Union[ModelConfig, None] = None
    bn_mode: Literal["eval", "train"] = "eval"
    dropout: bool = False  #: dropout layers active in the teacher (the official segmentation recipe)
    #: cached teacher outputs (engine/teacher_cache.py): auto, on (or true), off (or false)
    cache: Union[Literal["auto", "on", "off"], bool] = "auto"


@dataclass
class OptimConfig:
    """Optimizer: ``adam`` or ``sgd`` (momentum, optionally nesterov).

    ``lr_mult``: learning-rate multipliers of parameter groups, by name prefix: ``student.PATH``
    (a module path of the student, e.g. ``student.aspp``) or ``terms.NAME`` (a term's modules);
    the longest matching prefix wins, other parameters get 1 (e.g. the official DeepLab recipe:
    backbone 1x, ``student.aspp``, ``student.decoder`` and ``terms.ofd`` 10x).
    ``reset_at_milestones``: clear the stage's main optimizer state (momentum buffers, Adam
    moments) at the start of each ``schedule.milestones`` epoch, as the official OFD CIFAR
    script, which builds a new SGD at every learning-rate drop (multistep schedules in epochs).
    """

    name: Literal["adam", "sgd"] = "adam"
    lr: Annotated[float, Range(gt=0)] = 1e-3
    momentum: Annotated[float, Range(ge=0)] = 0.9
    nesterov: bool = False
    weight_decay: Annotated[float, Range(ge=0)] = 0.0
    lr_mult: dict[str, Annotated[float, Range(gt=0)]] = field(default_factory=dict)
    reset_at_milestones: bool = False


@dataclass
class ScheduleConfig:
    """Learning-rate schedule.

    ``none``; ``plateau`` (ReduceLROnPlateau on ``monitor``, stepped per epoch: ``test_loss`` as
    the MFD code, or ``val_loss`` with a validation split); ``multistep`` (``milestones``,
    ``gamma``); ``cosine`` (to ``min_lr``); ``poly`` (lr (1 - t/T)^``power``, the DeepLab
    recipe). ``unit``: whether t, T and the milestones count epochs or iterations (steps);
    ``span``: T covers the stage, or the whole run (every stage; the official segmentation code
    counts its connector epoch in the poly schedule).
    """

    name: Literal["none", "plateau", "multistep", "cosine", "poly"] = "none"
    unit: Literal["epoch", "iteration"] = "epoch"
    span: Literal["stage", "run"] = "stage"
    power: Annotated[float, Range(gt=0)] = 0.9
    monitor: Literal["test_loss", "val_loss"] = "test_loss"
    factor: Annotated[float, Range(gt=0, lt=1)] = 0.1
    patience: NonNegInt = 10
    milestones: list[NonNegInt] = field(default_factory=list)
    gamma: Annotated[float, Range(gt=0)] = 0.1
    min_lr: Annotated[float, Range(ge=0)] = 0.0


@dataclass
class StageConfig:
    """One training stage. Multi-stage recipes (FitNets hints, FT paraphraser, AB init) are lists.

    ``epochs``: epochs of this stage (None: the run's ``epochs``); ``epochs_scale``: instead, a
    fraction of the run's ``epochs`` (e.g. 0.5 for MFD's FitNet hint stage); ``iterations``:
    instead, a number of steps (the last pass over the data is cut short; e.g. SSD's
    500-iteration connector stage). ``terms``: names of the active terms (None: all).
    ``ce_weight``: weight of the task loss (cross-entropy; MultiBox for detection).
    ``train``: what is optimised: ``student`` and/or term names (None: the student and every
    active term). ``student_mode``: ``auto`` (train mode when the student is trained), or
    ``train`` (BN statistics move although the student is not stepped: the official
    segmentation connector epoch) or ``eval``. ``optim`` / ``schedule``: overrides of the run's
    sections for this stage. ``teacher_bn_mode``: overrides ``teacher.bn_mode`` in this stage
    (e.g. AB's initialisation). ``optimizer``: ``new`` optimizers, or ``continue`` the previous
    stage's state (moments, step counts) for every parameter both stages train, with this
    stage's settings (the official MFD FitNet's one Adam for both stages). ``evaluate``: false
    skips the test (and val) evaluations of this stage's epochs (MFD's FitNet hint stage),
    except at the end of the run.
    """

    name: str = "main"
    epochs: Union[NonNegInt, None] = None
    epochs_scale: Union[Annotated[float, Range(ge=0)], None] = None
    iterations: Union[PosInt, None] = None
    terms: Union[list[str], None] = None
    ce_weight: Annotated[float, Range(ge=0)] = 1.0
    train: Union[list[str], None] = None
    student_mode: Literal["auto", "train", "eval"] = "auto"
    optim: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    teacher_bn_mode: Union[Literal["eval", "train"], None] = None
    optimizer: Literal["new", "continue"] = "new"
    evaluate: bool = True


@dataclass
class RunConfig:
    """One training run. See the README for every key."""

    name: str = ""  #: a label for tables (defaults to the config file's stem)
    out: str = ""  #: run directory (default ``runs/<data.name>/<name>/seed<seed>``)
    seed: NonNegInt = 0
    epochs: NonNegInt = 50
    device: str = "cpu"  #: cpu | cuda | cuda:N
    method: str = "scratch"  #: a preset or presets joined by '+', e.g. ``ss+hkd``
    task: dict = field(default_factory=dict)  #: options of the data set's task (``fairdistill.tasks``)
    terms: dict = field(default_factory=dict)  #: term name -> {type, weight, weight_end, options...}
    stages: list[StageConfig] = field(default_factory=list)  #: empty: one main stage
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    #: evaluate the test (and val) set every N epochs; 0: only when a metric is used (the end of the
    #: run, a plateau schedule's monitor; engine.trainer.evaluations). ``best`` is the best evaluated epoch
    eval_every: NonNegInt = field(default=0, metadata={"former_defaults": (1,)})
    progress: bool = True  #: show a progress line while training
    #: ask PyTorch for deterministic kernels (torch.use_deterministic_algorithms) on CUDA and with compile;
    #: the CPU's eager kernels are deterministic already, and the call is skipped there
    deterministic: bool = True
    threads: NonNegInt = 0  #: CPU threads for PyTorch (0: PyTorch's default)
    amp: Literal["off", "bf16", "fp16"] = "off"  #: mixed precision (fp16 uses a GradScaler)
    #: NHWC memory layout for models and inputs: true, false, or auto (engine.defaults.resolve_channels_last:
    #: channels-last on the CPU for the zoo families measured faster there, NCHW elsewhere)
    channels_last: Union[bool, Literal["auto"]] = field(default="auto", metadata={"former_defaults": (False,)})
    compile: bool = False  #: torch.compile the student's and teacher's forwards
    loggers: list[Literal["tensorboard", "csv", "wandb"]] = field(default_factory=list)  #: scalars per epoch (loggers.py)
    save_predictions: bool = False  #: write predictions.csv (one row per test item) at the final epoch
    plugins: list[str] = field(default_factory=list)  #: modules imported before the config is checked (plugins.py)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def non_default(cfg) -> dict:
    """The fields of dataclass ``cfg`` whose values differ from the field defaults, recursively
    (sections, stages), as plain data: what a config says beyond the defaults, so that a key
    added to the schema later (with its default) leaves it unchanged. A value that was the
    field's default in an earlier version (``metadata["former_defaults"]``: ``eval_every`` 1,
    ``channels_last`` false) counts as a default too, so that configs saved then keep theirs."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
        if any(type(value) is type(v) and value == v for v in f.metadata.get("former_defaults", ())):
            continue
        if dataclasses.is_dataclass(value):
            sub = non_default(value)
            if sub or default is None:
                out[f.name] = sub
        elif isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value):
            out[f.name] = [non_default(v) if dataclasses.is_dataclass(v) else v for v in value]
        elif value != default:
            out[f.name] = value
    return out


RESUMABLE = ("progress", "device", "compile", "threads", "loggers", "save_predictions")
"""Config keys that may differ when a run is resumed (e.g. continue a CUDA run on the CPU)."""


def config_changes(saved: RunConfig, now: RunConfig, ignore: tuple = ()) -> list[str]:
    """Top-level keys in which two configs differ, except :data:`RESUMABLE` and ``ignore``."""
    a, b = to_dict(saved), to_dict(now)
    return sorted(k for k in b if k not in (*RESUMABLE, *ignore) and a.get(k) != b[k])


def stage_list(cfg: RunConfig) -> list[StageConfig]:
    """The run's stages with epochs resolved (one main stage when ``stages`` is empty); a stage
    measured in ``iterations`` keeps ``epochs`` None (it depends on the loader's length)."""
    stages = [dataclasses.replace(s) for s in cfg.stages] or [StageConfig()]
    for st in stages:
        if st.epochs is None and st.iterations is None:
            st.epochs = int(round(cfg.epochs * st.epochs_scale)) if st.epochs_scale is not None else cfg.epochs
    return stages


def stage_optim(cfg: RunConfig, index: int, stage: StageConfig) -> OptimConfig:
    """The run's optimizer settings with stage ``index``'s overrides."""
    return from_dict(OptimConfig, {**to_dict(cfg.optim), **stage.optim}, f"stages[{index}].optim")


def stage_schedule(cfg: RunConfig, index: int, stage: StageConfig) -> ScheduleConfig:
    """The run's schedule settings with stage ``index``'s overrides."""
    return from_dict(ScheduleConfig, {**to_dict(cfg.schedule), **stage.schedule}, f"stages[{index}].schedule")
