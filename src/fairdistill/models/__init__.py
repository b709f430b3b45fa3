"""The model zoo. Every model honours the feature contract of ``models.base``."""
from __future__ import annotations

from torch import nn

from ..registry import check_kwargs
from . import cifar_cnn, mobilenet, pyramidnet, resnet_cifar, resnet_imagenet, shufflenet, wrn  # noqa: F401
from .base import MODELS, FeatureModel, Features, count_parameters
from .hooks import HookedModel

__all__ = ["MODELS", "FeatureModel", "Features", "HookedModel", "build_model", "count_parameters"]


def build_model(name: str, num_classes: int, key: str = "model", **options) -> FeatureModel:
    """Build zoo model ``name`` with a ``num_classes`` head; ``options`` are its keyword options.

    Unknown names or options raise a ConfigError naming ``key``.
    """
    builder = MODELS.get(name, key=f"{key}.name")
    check_kwargs(builder, options, f"{key}.options")
    model = builder(num_classes=num_classes, **options)
    assert isinstance(model, nn.Module)
    return model
