"""Loading a user's ImageNet backbone weights from a local file, without running its code.

The official segmentation code initialises its backbones from torchvision's ImageNet files
(reference/dense.md §1.1: ``resnet101-5d3b4d8f.pth``, ``resnet18-5c106cde.pth``, a MobileNetV2
file). Nothing is downloaded here: the user hands in the file. It is read with
``torch.load(weights_only=True)`` (``.pth``/``.pt``/``.tar``) or, for ``.safetensors``, with the
``safetensors`` package when it is installed. A dict wrapped under ``state_dict`` or ``model`` is
unwrapped, and a ``module.`` prefix on every key (a DataParallel save) is removed.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

WRAPPERS = ("state_dict", "model")
SHOWN = 5  # mismatching keys named in an error


def read_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file; ``key`` names the config option in errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: no file {str(p)!r}; expected a torchvision-format ImageNet state dict "
                          "(.pth read with torch.load(weights_only=True), or .safetensors).")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{key}: {str(p)!r} is a .safetensors file, which needs the safetensors "
                              "package (pip install safetensors); or save the weights as a .pth file.") from None
        try:
            state = load_file(str(p))
        except Exception as e:  # the package raises its own error types for a corrupt header
            raise ConfigError(f"{key}: {str(p)!r} is not a readable .safetensors file ({e}).") from None
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for code objects, RuntimeError for a bad archive
            raise ConfigError(f"{key}: {str(p)!r} cannot be read with torch.load(weights_only=True) ({e}); "
                              "expected a plain state dict of tensors.") from None
    for wrapper in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {str(p)!r} does not hold a state dict (a mapping of names to tensors).")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_backbone_weights(module: nn.Module, path: str | Path, ignore: tuple[str, ...] = (),
                          key: str = "model.options.backbone_weights") -> None:
    """Copy the file's tensors into ``module``, which must match it key for key and shape for shape.

    Keys starting with a prefix in ``ignore`` (the classifier: ``fc.``, ``classifier.``) are dropped
    first. BatchNorm ``num_batches_tracked`` counters may be absent (older torchvision files have
    none); every other key of ``module`` must be in the file and the file may hold no other key.
    A mismatch is a ConfigError naming the file and the first mismatching keys.
    """
    state = {k: v for k, v in read_state_dict(path, key).items() if not k.startswith(ignore)}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{what}: {', '.join(keys[:SHOWN])}{' ...' if len(keys) > SHOWN else ''} ({len(keys)} in all)"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", shapes)) if keys]
    if problems:
        raise ConfigError(f"{key}: {str(path)!r} does not match the {type(module).__name__} backbone; "
                          + "; ".join(problems) + ". Expected a torchvision-format ImageNet state dict of "
                          "the same architecture.")
    module.load_state_dict({**own, **state}, strict=True)
