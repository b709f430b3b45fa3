"""Adapt any ``nn.Module`` classifier to the feature contract by naming module paths.

Captures use forward hooks (outputs) or forward pre-hooks (inputs) that are registered for one
``forward_features`` call and removed afterwards, so copies of the model carry no stale hooks.
Each captured tensor is cloned inside the hook: a later in-place op (``nn.ReLU(inplace=True)``,
``out += identity``) would otherwise overwrite the pre-activation it was meant to keep
(DESIGN.md, contract 2). The clone is differentiable, so gradients reach the model.

A capture point is a module path, its output by default or its input with the suffix
``:input`` (``"fc:input"``: the classifier's input, the penultimate embedding). A point must
run exactly once per forward, except where ``prerelu`` resolved it to one call of a module that
runs several times.

``prerelu`` (OFD §3.2: distil before the ReLU). A stage module whose output is made by an
activation module inside it (a torchvision ``BasicBlock`` ends with ``out = self.relu(out)``,
a ``Sequential`` may end with ``nn.ReLU``) returns a post-activation tensor. With ``prerelu``
a dry forward finds that activation call, and the stage feature becomes the input of that call,
the exact pre-activation, even when the block reuses one ReLU module for several calls (the
torchvision blocks: the point is then "call k of n" of that module). The BatchNorm whose output
object feeds that call is the stage's default BN for OFD margins (for a residual block the BN
before the shortcut is added, as the official OFD code takes ``bn2`` / ``bn3``). Where no
activation module makes the output (a functional ``F.relu``), the output is kept as it is and a
warning says so. Each resolution is logged and kept in :attr:`HookedModel.notes`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import suggest
from .base import FeatureModel, Features

log = logging.getLogger(__name__)

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish)
"""Module types whose input is a pre-activation for ``prerelu``."""
INPUT, OUTPUT = ":input", ":output"


@dataclass(frozen=True)
class Point:
    """The output (or, with ``input``, the input) of module ``path``: at its only call in one
    forward (``call=None``), or at call ``call`` (0-based) of the ``calls`` it makes."""

    path: str
    input: bool = False
    call: int | None = None
    calls: int | None = None

    def __str__(self) -> str:
        text = self.path + (INPUT if self.input else "")
        return text if self.call is None else f"{text} (call {self.call + 1} of {self.calls})"


def parse_point(text: str, use_input: bool = False) -> tuple[str, bool]:
    """``"fc:input"`` -> ("fc", True); ``"layer1"`` / ``"layer1:output"`` -> ("layer1", use_input / False)."""
    if isinstance(text, str) and text.endswith(INPUT):
        return text[: -len(INPUT)], True
    if isinstance(text, str) and text.endswith(OUTPUT):
        return text[: -len(OUTPUT)], False
    return text, use_input


def _flags(value: bool | Sequence[bool], n: int, key: str) -> list[bool]:
    flags = [bool(value)] * n if isinstance(value, bool) else [bool(v) for v in value]
    if len(flags) != n:
        raise ConfigError(f"{key}: got {len(flags)} flags for {n} stages; give one per stage or a single bool.")
    return flags


def _channels_of(module: nn.Module, use_input: bool) -> int | None:
    """Channels of a module's output (or input) when its type fixes them, else None."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels if use_input else module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features if use_input else module.out_features
    return None


# ----------------------------------------------------------------------------- dry forward


@dataclass
class Call:
    """One module call seen by :func:`trace`: first input and output objects, and (for
    activations and BatchNorms) copies of their values at the time of the call."""

    path: str
    index: int
    module: nn.Module
    input: Any
    output: Any
    input_value: torch.Tensor | None = None
    output_value: torch.Tensor | None = None


def dry_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """One random (1, *input_shape) batch on the model's device and dtype (a fixed local
    generator: the global RNG is untouched)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, *input_shape, generator=gen).to(device, dtype)


def trace(model: nn.Module, x: torch.Tensor) -> tuple[list[Call], Any]:
    """Every submodule call of one ``model(x)`` in eval mode without gradients, in order of
    completion, and the output; modes are restored afterwards (BN statistics do not move)."""
    calls: list[Call] = []
    counts: dict[str, int] = {}
    pending: dict[str, list[Any]] = {}
    handles = []

    def pre(path):
        def hook(module, args):
            first = args[0] if args else None
            keep = first.clone() if isinstance(module, ACTIVATIONS) and isinstance(first, torch.Tensor) else None
            pending.setdefault(path, []).append((first, keep))
        return hook

    def post(path):
        def hook(module, args, out):
            first, keep = pending[path].pop()
            k = counts.get(path, 0)
            counts[path] = k + 1
            copy = isinstance(module, (*ACTIVATIONS, nn.modules.batchnorm._BatchNorm)) and isinstance(out, torch.Tensor)
            calls.append(Call(path, k, module, first, out, keep, out.clone() if copy else None))
        return hook

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for path, module in model.named_modules():
            if path:
                handles.append(module.register_forward_pre_hook(pre(path)))
                handles.append(module.register_forward_hook(post(path)))
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return calls, out


def classifier_path(calls: list[Call], logits: Any) -> str | None:
    """The innermost module whose output is the logits tensor itself (the classifier), if it
    runs once; its input is the penultimate embedding."""
    for c in calls:  # forward hooks fire inner modules first
        if c.output is logits and sum(1 for d in calls if d.path == c.path) == 1:
            return c.path
    return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def resolve_prerelu(calls: list[Call], stage: str) -> tuple[Point | None, str | None, str]:
    """The pre-activation point of stage module ``stage``: (point or None, default BN path or
    None, a note saying what is captured)."""
    own = [c for c in calls if c.path == stage]
    if len(own) != 1:
        return None, None, f"{stage!r} ran {len(own)} times in the dry forward"
    out = own[0].output
    if isinstance(own[0].module, ACTIVATIONS):
        return Point(stage, True), None, f"{stage!r} is an activation: its input is captured"
    if not isinstance(out, torch.Tensor):
        return None, None, f"the output of {stage!r} is a {type(out).__name__}"
    final = out.detach()
    acts = [c for c in calls if _inside(c.path, stage) and isinstance(c.module, ACTIVATIONS)
            and c.output is out and torch.equal(c.output_value, final)]
    if not acts:
        kind = "non-negative: it looks post-activation" if bool((final >= 0).all()) else "kept as it is"
        return None, None, (f"no activation module inside {stage!r} makes its output, so its output is captured "
                            f"({kind}); if it ends with a functional ReLU, name the module before it as the stage")
    act = acts[-1]
    n = sum(1 for c in calls if c.path == act.path)
    point = Point(act.path, True, None if n == 1 else act.index, None if n == 1 else n)
    note = f"the input of {act.path!r}" + ("" if n == 1 else f" at its call {act.index + 1} of {n} (a reused module)")
    bns = [c for c in calls if _inside(c.path, stage) and isinstance(c.module, nn.modules.batchnorm._BatchNorm)
           and c.output is act.input]
    bn = None
    if bns:
        bn = bns[-1].path
        exact = act.input_value is not None and torch.equal(bns[-1].output_value, act.input_value)
        note += f"; margins from {bn!r}" + ("" if exact else " (the BN before a residual addition, as official OFD)")
    return point, bn, note


# ----------------------------------------------------------------------------- the adapter


class HookedModel(FeatureModel):
    """Expose ``model``'s modules as OFD/MFD distillation points.

    stages:       capture points (module paths, optionally ``PATH:input``), shallow to deep; may
                  be empty when ``embedding`` is given (terms on stages then find none).
    embedding:    point of the penultimate representation (``"fc:input"``); None: the last stage.
    stage_bns:    per stage, the path of the BatchNorm whose output is the stage feature (for OFD
                  margins), or None there. None as a whole: the BN found by ``prerelu``, else the
                  stage module itself when it is a BatchNorm, else None.
    stage_inputs: capture each stage module's input instead of its output (one bool for all or
                  one per stage); the same as the ``:input`` suffix.
    embedding_input: capture the embedding module's input (e.g. the input of the classifier ``fc``).
    prerelu:      resolve stage outputs made by an activation module to that activation's input
                  (module docstring; one bool or one per stage); needs ``input_shape``.
    input_shape:  (C, H, W) for a dry forward that resolves ``prerelu`` and finds the stage
                  channels the module types do not fix (BatchNorm, Conv, Linear do).
    key:          the config key named in errors (e.g. ``model.features``).

    ``forward`` runs ``model`` unchanged; ``forward_features`` returns the same logits.
    ``extra["block"]`` (post-activation stage outputs, the earlier methods' position) exists
    when every stage was resolved by ``prerelu``.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[str],
        embedding: str | None = None,
        stage_bns: Sequence[str | None] | None = None,
        stage_inputs: bool | Sequence[bool] = False,
        embedding_input: bool = False,
        input_shape: Sequence[int] | None = None,
        prerelu: bool | Sequence[bool] = False,
        key: str = "HookedModel",
    ):
        super().__init__()
        self._key_root = key
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{key}: model must be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(stages, str) or (not stages and embedding is None):
            raise ConfigError(f"{self._key('stages')}: expected a non-empty list of module paths, e.g. ['layer1', 'layer2'].")
        self.model = model
        inputs = _flags(stage_inputs, len(stages), self._key("stage_inputs"))
        parsed = [parse_point(p, f) for p, f in zip(stages, inputs)]
        paths = [self._check_path(p, f"stages[{i}]") for i, (p, _) in enumerate(parsed)]
        resolve = _flags(prerelu, len(stages), self._key("prerelu"))
        self.stage_points = [Point(p, f) for p, (_, f) in zip(paths, parsed)]
        self.embedding_point = None
        if embedding is not None:
            e_path, e_in = parse_point(embedding, embedding_input)
            self.embedding_point = Point(self._check_path(e_path, "embedding"), e_in)
        self.block_points: list[Point] = []
        self.notes: list[str] = []
        found_bns: list[str | None] = [None] * len(paths)
        if any(resolve):
            if input_shape is None:
                raise ConfigError(f"{self._key('prerelu')}: finding the pre-ReLU points needs a dry forward; "
                                  "pass input_shape=(C, H, W).")
            calls, _ = self._dry(lambda x: trace(model, x), input_shape)
            self._resolve(calls, resolve, found_bns)
        self.bn_paths = self._bn_paths(stage_bns, found_bns)
        self.stage_channels = self._find_channels(input_shape)
        self._check_bns()

    def _key(self, sub: str) -> str:
        return f"HookedModel {sub}" if self._key_root == "HookedModel" else f"{self._key_root}.{sub}"

    def _check_path(self, path: str, key: str) -> str:
        names = [n for n, _ in self.model.named_modules() if n]
        if not isinstance(path, str) or path not in names:
            raise ConfigError(
                f"{self._key(key)}: {type(self.model).__name__} has no module {path!r}.{suggest(path, names)} "
                "Paths are the names of model.named_modules()."
            )
        return path

    def _resolve(self, calls: list[Call], resolve: list[bool], found_bns: list[str | None]) -> None:
        blocks = []
        for i, point in enumerate(self.stage_points):
            if not resolve[i] or point.input:
                blocks.append(None)
                continue
            new, bn, note = resolve_prerelu(calls, point.path)
            message = f"{self._key(f'stages[{i}]')} {point.path!r}: {note}"
            self.notes.append(message)
            (log.info if new is not None else log.warning)(message)
            if new is None:
                blocks.append(None)
                continue
            self.stage_points[i] = new
            found_bns[i] = bn
            out = Point(new.path, False, new.call, new.calls) if new.path != point.path else Point(point.path)
            blocks.append(out)
        if blocks and all(b is not None for b in blocks):
            self.block_points = blocks

    def _bn_paths(self, stage_bns, found: list[str | None]) -> list[str | None]:
        if stage_bns is None:
            out = []
            for p, bn in zip(self.stage_points, found):
                own = self.model.get_submodule(p.path)
                is_bn = isinstance(own, nn.modules.batchnorm._BatchNorm) and not p.input and p.call is None
                out.append(bn if bn is not None else (p.path if is_bn else None))
            return out
        bns = list(stage_bns)
        if len(bns) != len(self.stage_points):
            raise ConfigError(f"{self._key('stage_bns')}: got {len(bns)} entries for {len(self.stage_points)} stages.")
        return [None if p is None else self._check_path(p, f"stage_bns[{i}]") for i, p in enumerate(bns)]

    def _find_channels(self, input_shape: Sequence[int] | None) -> list[int]:
        channels = [None if p.call is not None else _channels_of(self.model.get_submodule(p.path), p.input)
                    for p in self.stage_points]
        if all(c is not None for c in channels):
            return channels
        if input_shape is None:
            unknown = [str(p) for p, c in zip(self.stage_points, channels) if c is None]
            raise ConfigError(
                f"{self._key('stages')}: cannot tell the channels of {unknown} from their module types; "
                "pass input_shape=(C, H, W) so that a dry forward can measure them."
            )
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                feats = self._dry(self.forward_features, input_shape)
        finally:
            for m, mode in modes.items():
                m.training = mode
        return [s.shape[1] for s in feats.stages]

    def _dry(self, fn, input_shape: Sequence[int]):
        """``fn`` on a dry input; the model's own failure becomes a ConfigError naming the shape."""
        try:
            return fn(dry_input(self.model, input_shape))
        except ConfigError:
            raise
        except Exception as e:  # the user's model failed on this input: say which input
            raise ConfigError(f"{self._key_root}: a dry forward of {type(self.model).__name__} on a "
                              f"{(1, *input_shape)} input failed ({type(e).__name__}: {e}); check the model "
                              "against the data's image size and channels.") from None

    def _check_bns(self) -> None:
        for i, p in enumerate(self.bn_paths):
            if p is None:
                continue
            bn = self.model.get_submodule(p)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                raise ConfigError(f"{self._key(f'stage_bns[{i}]')}: {p!r} is a {type(bn).__name__}, not a BatchNorm.")
            if bn.num_features != self.stage_channels[i]:
                raise ConfigError(
                    f"{self._key(f'stage_bns[{i}]')}: {p!r} has {bn.num_features} channels but stage "
                    f"{str(self.stage_points[i])!r} has {self.stage_channels[i]}."
                )

    # -- the contract ------------------------------------------------------------

    @property
    def stage_paths(self) -> list[str]:
        return [p.path for p in self.stage_points]

    def stage_bns(self) -> list[nn.Module | None]:
        return [None if p is None else self.model.get_submodule(p) for p in self.bn_paths]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> Features:
        points = [*self.stage_points, *([self.embedding_point] if self.embedding_point else []), *self.block_points]
        wanted: dict[tuple[str, bool], list[Point]] = {}
        for pt in dict.fromkeys(points):
            wanted.setdefault((pt.path, pt.input), []).append(pt)
        counts = dict.fromkeys(wanted, 0)
        values: dict[Point, list[torch.Tensor]] = {pt: [] for pts in wanted.values() for pt in pts}

        def store(where: tuple[str, bool], value) -> None:
            k = counts[where]
            counts[where] = k + 1
            for pt in wanted[where]:
                if pt.call is not None and pt.call != k:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise ConfigError(f"{self._key('stages')}: the {'input' if pt.input else 'output'} of "
                                      f"{pt.path!r} is a {type(value).__name__}, not a tensor.")
                values[pt].append(value.clone())

        def register(where: tuple[str, bool]):
            module = self.model.get_submodule(where[0])
            if where[1]:
                return module.register_forward_pre_hook(lambda mod, args: store(where, args[0] if args else None))
            return module.register_forward_hook(lambda mod, args, out: store(where, out))

        handles = []
        try:
            for where in wanted:
                handles.append(register(where))
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(logits, torch.Tensor):
            raise ConfigError(f"{self._key_root}: {type(self.model).__name__} returned a {type(logits).__name__}; "
                              "it must return the logits tensor.")
        for where, pts in wanted.items():
            for pt in pts:
                if pt.call is None and counts[where] != 1:
                    raise ConfigError(
                        f"{self._key_root}: module {pt.path!r} ran {counts[where]} times in one forward; name a module "
                        "that runs exactly once (a module reused in several places, like torchvision's block "
                        "'relu', cannot be a capture point; with prerelu, name the block and its ReLU call is found)."
                    )
                if pt.call is not None and counts[where] != pt.calls:
                    raise ConfigError(f"{self._key_root}: module {pt.path!r} ran {counts[where]} times in this forward "
                                      f"and {pt.calls} times in the dry forward that chose call {pt.call + 1}.")
        stages = [values[pt][0] for pt in self.stage_points]
        embedding = values[self.embedding_point][0] if self.embedding_point is not None else stages[-1]
        extra = {"block": [values[pt][0] for pt in self.block_points]} if self.block_points else {}
        return Features(logits=logits, stages=stages, embedding=embedding, extra=extra)
