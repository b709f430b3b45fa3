"""Adapt any ``nn.Module`` classifier to the feature contract by naming module paths.

Captures use forward hooks (outputs) or forward pre-hooks (inputs) that are registered for one
``forward_features`` call and removed afterwards, so copies of the model carry no stale hooks.
Each captured tensor is cloned inside the hook: a later in-place op (``nn.ReLU(inplace=True)``,
``out += identity``) would otherwise overwrite the pre-activation it was meant to keep
(DESIGN.md, contract 2). The clone is differentiable, so gradients reach the model.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import suggest
from .base import FeatureModel, Features


def _flags(value: bool | Sequence[bool], n: int, key: str) -> list[bool]:
    flags = [bool(value)] * n if isinstance(value, bool) else [bool(v) for v in value]
    if len(flags) != n:
        raise ConfigError(
            f"HookedModel {key}: got {len(flags)} flags for {n} stages; give one per stage or a single bool."
        )
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


class HookedModel(FeatureModel):
    """Expose ``model``'s modules as OFD/MFD distillation points.

    stages:       dotted module paths (``"layer1"``, ``"layer2.1.bn2"``), shallow to deep.
    embedding:    path of the penultimate representation; None means the last stage feature.
    stage_bns:    per stage, the path of the BatchNorm whose output is the stage feature (for OFD
                  margins), or None; the whole argument may be None.
    stage_inputs: capture each stage module's input instead of its output (one bool for all or
                  one per stage); e.g. the input of an activation module is its pre-activation.
    embedding_input: capture the embedding module's input (e.g. the input of the classifier ``fc``).
    input_shape:  (C, H, W) for a dry forward that finds stage channels the module types do not
                  fix (BatchNorm, Conv, Linear do); required only then.

    ``forward`` runs ``model`` unchanged; ``forward_features`` returns the same logits.
    Every hooked module must run exactly once per forward.
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
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"HookedModel: model must be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(stages, str) or not stages:
            raise ConfigError(
                "HookedModel stages: expected a non-empty list of module paths, e.g. ['layer1', 'layer2']."
            )
        self.model = model
        self.stage_paths = [self._check_path(p, f"stages[{i}]") for i, p in enumerate(stages)]
        self.stage_inputs = _flags(stage_inputs, len(self.stage_paths), "stage_inputs")
        self.embedding_path = None if embedding is None else self._check_path(embedding, "embedding")
        self.embedding_input = bool(embedding_input)
        bns = [None] * len(self.stage_paths) if stage_bns is None else list(stage_bns)
        if len(bns) != len(self.stage_paths):
            raise ConfigError(f"HookedModel stage_bns: got {len(bns)} entries for {len(self.stage_paths)} stages.")
        self.bn_paths = [None if p is None else self._check_path(p, f"stage_bns[{i}]") for i, p in enumerate(bns)]
        self.stage_channels = self._find_channels(input_shape)
        for i, p in enumerate(self.bn_paths):
            if p is None:
                continue
            bn = self.model.get_submodule(p)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                raise ConfigError(f"HookedModel stage_bns[{i}]: {p!r} is a {type(bn).__name__}, not a BatchNorm.")
            if bn.num_features != self.stage_channels[i]:
                raise ConfigError(
                    f"HookedModel stage_bns[{i}]: {p!r} has {bn.num_features} channels but stage "
                    f"{self.stage_paths[i]!r} has {self.stage_channels[i]}."
                )

    def _check_path(self, path: str, key: str) -> str:
        names = [n for n, _ in self.model.named_modules() if n]
        if not isinstance(path, str) or path not in names:
            raise ConfigError(
                f"HookedModel {key}: {type(self.model).__name__} has no module {path!r}.{suggest(path, names)} "
                "Paths are the names of model.named_modules()."
            )
        return path

    def _find_channels(self, input_shape: Sequence[int] | None) -> list[int]:
        mods = [self.model.get_submodule(p) for p in self.stage_paths]
        channels = [_channels_of(m, inp) for m, inp in zip(mods, self.stage_inputs)]
        if all(c is not None for c in channels):
            return channels
        if input_shape is None:
            unknown = [p for p, c in zip(self.stage_paths, channels) if c is None]
            raise ConfigError(
                f"HookedModel: cannot tell the channels of {unknown} from their module types; "
                "pass input_shape=(C, H, W) so that a dry forward can measure them."
            )
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                feats = self.forward_features(torch.zeros(1, *input_shape, device=device, dtype=dtype))
        finally:
            for m, mode in modes.items():
                m.training = mode
        return [s.shape[1] for s in feats.stages]

    def stage_bns(self) -> list[nn.Module | None]:
        return [None if p is None else self.model.get_submodule(p) for p in self.bn_paths]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> Features:
        points = list(zip(self.stage_paths, self.stage_inputs))
        if self.embedding_path is not None:
            points.append((self.embedding_path, self.embedding_input))
        captured: dict[tuple[str, bool], list[torch.Tensor]] = {pt: [] for pt in points}

        def store(point: tuple[str, bool], value) -> None:
            if not isinstance(value, torch.Tensor):
                what = "input" if point[1] else "output"
                raise ConfigError(f"HookedModel: the {what} of {point[0]!r} is a {type(value).__name__}, not a tensor.")
            captured[point].append(value.clone())

        def register(point: tuple[str, bool]):
            module = self.model.get_submodule(point[0])
            if point[1]:
                return module.register_forward_pre_hook(lambda mod, args: store(point, args[0] if args else None))
            return module.register_forward_hook(lambda mod, args, out: store(point, out))

        handles = []
        try:
            for point in captured:
                handles.append(register(point))
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(logits, torch.Tensor):
            raise ConfigError(
                f"HookedModel: {type(self.model).__name__} returned a {type(logits).__name__}; "
                "it must return the logits tensor."
            )
        for (path, _), values in captured.items():
            if len(values) != 1:
                raise ConfigError(
                    f"HookedModel: module {path!r} ran {len(values)} times in one forward; name a module "
                    "that runs exactly once (a module reused in several places, like torchvision's block "
                    "'relu', cannot be a capture point)."
                )
        stages = [captured[pt][0] for pt in points[: len(self.stage_paths)]]
        embedding = captured[points[-1]][0] if self.embedding_path is not None else stages[-1]
        return Features(logits=logits, stages=stages, embedding=embedding)
