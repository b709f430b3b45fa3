"""The model zoo. Every model honours the feature contract of ``models.base``."""
from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError
from ..registry import check_options
from . import (  # noqa: F401  (register the zoo)
    cifar_cnn, deeplab, mobilenet, mobilenetv2, pyramidnet, resnet_cifar, resnet_imagenet, shufflenet, ssd, wrn,
)
from .base import MODELS, NUM_CLASSES, FeatureModel, FeatureNotComputed, Features, OutputsOnly, count_parameters
from .external import adapt, build_external, check_factory_options, check_logits, is_import_path
from .hooks import HookedModel

__all__ = ["MODELS", "FeatureModel", "FeatureNotComputed", "Features", "HookedModel", "OutputsOnly", "build_model",
           "check_model_options", "count_parameters"]


def build_model(name: str, num_classes: int, key: str = "model", features=None,
                input_shape: Sequence[int] | None = None, **options) -> FeatureModel:
    """Build model ``name`` with a ``num_classes`` head; ``options`` are its keyword options.

    ``name`` is a zoo name (:data:`MODELS`, plugins' models included) or an import path
    (``package.module:factory``, ``torchvision:NAME``, ``timm:NAME``; ``models/external.py``).
    ``input_shape`` (C, H, W) is the data's image shape: a zoo builder that takes
    ``image_size`` / ``in_channels`` gets H (square images) / C where ``options`` leaves them
    unset, and a dry forward checks the output against ``num_classes`` for models from outside
    the zoo. ``features`` (``model.features``) names feature positions: any module that is not
    a FeatureModel, or any model given ``features``, is adapted by module paths
    (:func:`~.external.adapt`). Unknown names or options raise a ConfigError naming ``key``.
    """
    if is_import_path(name):
        model = build_external(name, num_classes, options, key)
    else:
        builder = MODELS.get(name, key=f"{key}.name")
        options = check_options(builder, options, f"{key}.options",
                                reserved=NUM_CLASSES)
        model = builder(num_classes=num_classes, **{**data_options(builder, input_shape), **options})
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{key}.name: the builder of {name!r} returned a {type(model).__name__}, not an nn.Module")
    if isinstance(model, FeatureModel) and features is None:
        return model
    if input_shape is not None:
        check_logits(model, input_shape, num_classes, f"{key}.name")
    return adapt(model, features, input_shape, key)


def check_model_options(name: str, options: dict, key: str = "model") -> dict:
    """``options`` of model ``name`` (a zoo name or an import path) checked against its
    builder's signature and annotations, coerced; a ConfigError names ``key``."""
    if is_import_path(name):
        return check_factory_options(name, options, key)
    return check_options(MODELS.get(name, key=f"{key}.name"), options, f"{key}.options",
                         reserved=NUM_CLASSES)


def data_options(builder, input_shape: Sequence[int] | None) -> dict:
    """``image_size`` (square images) and ``in_channels`` from the data, for a builder that takes them."""
    if input_shape is None:
        return {}
    params = inspect.signature(builder).parameters
    out = {}
    if "in_channels" in params:
        out["in_channels"] = int(input_shape[0])
    if "image_size" in params and len(input_shape) == 3 and input_shape[1] == input_shape[2]:
        out["image_size"] = int(input_shape[1])
    return out
