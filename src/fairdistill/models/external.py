"""Models from outside the zoo, and the feature positions of any model from the config.

``model.name`` may be an import path instead of a zoo name:

* ``package.module:factory``: the factory (a function or an ``nn.Module`` class; the attribute
  may be dotted) returns an ``nn.Module``; ``model.options`` are its keywords, checked against
  its signature; ``num_classes`` (the data set's) is passed when it has that parameter.
* ``torchvision:NAME`` (``torchvision.models.get_model_builder(NAME)``) and ``timm:NAME``
  (``timm.create_model(NAME, pretrained=False)``), when those packages import; both get
  ``num_classes``. Their download options (``weights``, ``pretrained``, ...) are refused:
  initial weights come from a local file through ``model.weights``.

Nothing is imported until such a name is used (torchvision and timm are optional).

Feature positions (``model.features``: ``stages``, ``embedding``, ``bns``, ``prerelu``; see
:func:`adapt`) turn any module into a :class:`~.hooks.HookedModel`. Defaults: the stage modules
of timm's ``feature_info`` (the modules timm's ``features_only`` taps), or ``layer1..layer4``
for a torchvision-style ResNet; the embedding is the input of the module that outputs the
logits (the classifier); ``prerelu`` resolves each stage to its exact pre-activation (the
torchvision blocks' reused ReLU included, hooks.py).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..plugins import _where, import_object
from ..registry import check_options, suggest
from .base import NUM_CLASSES, FeatureModel
from .hooks import HookedModel, classifier_path, dry_input, trace

log = logging.getLogger(__name__)

SHORTCUTS = ("torchvision", "timm")
NO_DOWNLOAD = "model.weights (a local file: nothing is downloaded)"
FEATURE_KEYS = ("stages", "embedding", "bns", "prerelu")


def is_import_path(name: str) -> bool:
    """Whether ``model.name`` is an import path (``module:factory``, ``torchvision:NAME``, ...)."""
    return isinstance(name, str) and ":" in name


@dataclass
class Factory:
    """A model factory named by an import path: the callable, the options the config may not
    set (name -> the key to use instead) and whether it takes ``num_classes``."""

    fn: Callable
    reserved: dict[str, str]
    takes_num_classes: bool


def _signature_target(fn):
    return fn.__init__ if isinstance(fn, type) else fn


def _torchvision(name: str, key: str) -> Factory:
    try:
        import torchvision.models as tvm
    except Exception as e:  # not installed, or built for another torch
        raise ConfigError(f"{key}: 'torchvision:{name}' needs torchvision, which cannot be imported here "
                          f"({type(e).__name__}: {e}); install a torchvision built for this torch, or name the "
                          "model as package.module:factory") from None
    try:
        names = tvm.list_models(module=tvm)
    except TypeError:  # torchvision < 0.15 lists every model
        names = tvm.list_models()
    if name not in names:
        raise ConfigError(f"{key}: torchvision has no classification model {name!r}.{suggest(name, names)}")
    reserved = {"weights": NO_DOWNLOAD, "progress": NO_DOWNLOAD, **NUM_CLASSES}
    return Factory(tvm.get_model_builder(name), reserved, True)


def _timm(name: str, key: str) -> Factory:
    try:
        import timm
    except Exception as e:
        raise ConfigError(f"{key}: 'timm:{name}' needs timm, which cannot be imported here ({type(e).__name__}: "
                          f"{e}); pip install timm, or name the model as package.module:factory") from None
    if not timm.is_model(name):
        raise ConfigError(f"{key}: timm has no model {name!r}.{suggest(name, timm.list_models())}")
    reserved = {k: NO_DOWNLOAD for k in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                                         "checkpoint_path", "cache_dir")}
    reserved.update(NUM_CLASSES)
    return Factory(functools.partial(timm.create_model, name, pretrained=False), reserved, True)


def model_factory(name: str, key: str = "model.name") -> Factory:
    """The factory an import path names (module docstring); a ConfigError names ``key``."""
    prefix, _, rest = name.partition(":")
    if prefix in SHORTCUTS:
        if not rest:
            raise ConfigError(f"{key}: {name!r} names no model; expected {prefix}:NAME, e.g. {prefix}:resnet18")
        return _torchvision(rest, key) if prefix == "torchvision" else _timm(rest, key)
    fn = import_object(name, key)
    if not callable(fn):
        raise ConfigError(f"{key}: {name!r} is a {type(fn).__name__}, not a callable that returns an nn.Module")
    try:
        params = inspect.signature(_signature_target(fn)).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "num_classes" in params
    return Factory(fn, {**NUM_CLASSES} if takes else {}, takes)


def check_factory_options(name: str, options: dict, key: str = "model") -> dict:
    """``options`` checked against the factory's signature and annotations (coerced)."""
    factory = model_factory(name, f"{key}.name")
    return check_options(_signature_target(factory.fn), options, f"{key}.options", reserved=factory.reserved)


def build_external(name: str, num_classes: int, options: dict, key: str = "model") -> nn.Module:
    """Call the factory of import path ``name`` with ``options`` (and ``num_classes``)."""
    factory = model_factory(name, f"{key}.name")
    options = check_options(_signature_target(factory.fn), options, f"{key}.options", reserved=factory.reserved)
    kwargs = {**options, **({"num_classes": num_classes} if factory.takes_num_classes else {})}
    try:
        module = factory.fn(**kwargs)
    except ConfigError:
        raise
    except Exception as e:  # the user's factory failed: say where
        raise ConfigError(f"{key}.name: {name} with options {kwargs} raised {type(e).__name__}: {e}{_where(e)}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{key}.name: {name} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


# ----------------------------------------------------------------------------- feature positions


def default_stages(module: nn.Module) -> tuple[list[str] | None, str]:
    """Default stage paths of ``module`` and where they come from, or (None, "")."""
    info = getattr(module, "feature_info", None)
    if isinstance(info, (list, tuple)) and info and all(isinstance(d, dict) and d.get("module") for d in info):
        return [d["module"] for d in info], "timm's feature_info"
    layers = [f"layer{i}" for i in range(1, 5)]
    if all(isinstance(getattr(module, n, None), nn.Sequential) for n in layers):
        return layers, "the ResNet layout layer1..layer4"
    return None, ""


def _as_dict(features) -> dict | None:
    if features is None:
        return None
    out = dataclasses.asdict(features) if dataclasses.is_dataclass(features) else dict(features)
    unknown = [k for k in out if k not in FEATURE_KEYS]
    if unknown:
        raise ConfigError(f"model.features.{unknown[0]}: unknown key. Valid keys: {', '.join(FEATURE_KEYS)}.")
    return out


def check_logits(model: nn.Module, input_shape: Sequence[int], num_classes: int, key: str) -> None:
    """A dry forward: a classifier's output must have ``num_classes`` columns."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(dry_input(model, input_shape))
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{key}: a dry forward of {type(model).__name__} on a {(1, *input_shape)} input failed "
                          f"({type(e).__name__}: {e}); check the model against the data's image size") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != num_classes:
        raise ConfigError(f"{key}: the model outputs {out.shape[1]} classes and the data set has {num_classes}; "
                          "give the factory a num_classes parameter (it receives the data set's) or set its head "
                          "size in model.options")


def adapt(module: nn.Module, features, input_shape: Sequence[int] | None, key: str = "model") -> FeatureModel:
    """``module`` with the feature contract.

    ``features`` (a mapping or ``config.FeaturesConfig``; None: the model's own contract):
      stages:    capture points of the stage features, shallow to deep (module paths;
                 ``PATH:input`` for a module's input); default: :func:`default_stages`.
      embedding: the point of the penultimate embedding; default: the input of the module that
                 outputs the logits (e.g. ``fc:input``), else the last stage.
      bns:       per stage, the BatchNorm for OFD margins (or null); default: the BN that
                 ``prerelu`` finds, or the stage module itself when it is a BatchNorm; where
                 none, OFD estimates the margin from training batches (OFD supplement A).
      prerelu:   true (default): each stage is its exact pre-activation (hooks.py); false: the
                 stage module's output as it is.
    A FeatureModel with ``features`` None is returned as it is; any other module gets defaults.
    """
    spec = _as_dict(features)
    if spec is None and isinstance(module, FeatureModel):
        return module
    spec = spec or {}
    stages = spec.get("stages")
    if stages is None:
        stages, source = default_stages(module)
        if stages is None:
            children = [n for n, _ in module.named_children()]
            raise ConfigError(
                f"{key}.features.stages: {type(module).__name__} has no default stage positions (timm's feature_info "
                "or a ResNet's layer1..layer4); name the modules whose outputs end its stages, shallow to deep, "
                f"e.g. {key}.features.stages=[{', '.join(children[:2]) or 'block1, block2'}] (its modules: "
                f"{', '.join(children) or 'none'})")
        log.info("%s.features.stages: %s (from %s)", key, stages, source)
    embedding = spec.get("embedding")
    if embedding is None and input_shape is not None:
        calls, logits = trace(module, dry_input(module, input_shape))
        head = classifier_path(calls, logits)
        embedding = f"{head}:input" if head is not None else None
    return HookedModel(module, list(stages), embedding, stage_bns=spec.get("bns"), input_shape=input_shape,
                       prerelu=spec.get("prerelu", True), key=f"{key}.features")
