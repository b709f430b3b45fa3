"""The model zoo. Every model honours the feature contract of ``models.base``."""
from __future__ import annotations

from torch import nn

from ..registry import check_options
from . import (  # noqa: F401  (register the zoo)
    cifar_cnn, deeplab, mobilenet, mobilenetv2, pyramidnet, resnet_cifar, resnet_imagenet, shufflenet, ssd, wrn,
)
from .base import MODELS, FeatureModel, FeatureNotComputed, Features, OutputsOnly, count_parameters
from .hooks import HookedModel

__all__ = ["MODELS", "FeatureModel", "FeatureNotComputed", "Features", "HookedModel", "OutputsOnly", "build_model",
           "count_parameters"]


def build_model(name: str, num_classes: int, key: str = "model", **options) -> FeatureModel:
    """Build zoo model ``name`` with a ``num_classes`` head; ``options`` are its keyword options.

    Unknown names or options raise a ConfigError naming ``key``.
    """
    builder = MODELS.get(name, key=f"{key}.name")
    options = check_options(builder, options, f"{key}.options",
                            reserved={"num_classes": "nothing: the data set fixes the number of classes"})
    model = builder(num_classes=num_classes, **options)
    assert isinstance(model, nn.Module)
    return model
