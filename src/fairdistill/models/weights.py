"""Initial weights from a user's file, read so that it cannot run code.

One loader for the student (``model.weights``), the teacher (``teacher.checkpoint``) and the
dense backbones (``backbone_weights``: torchvision's ImageNet files, reference/dense.md §1.1).
Nothing is downloaded: the user hands in the file.

Sources (:func:`read_state_dict`): a state dict file (``.pth``/``.pt``/``.tar``/... read with
``torch.load(weights_only=True)``), a checkpoint that wraps it under ``state_dict`` or
``model`` (a fairdistill ``checkpoint.pt`` included, unverified), or a ``.safetensors`` file
(needs the ``safetensors`` package, imported only then: ``pip install 'fairdistill[weights]'``).
A finished run folder is read by ``engine/build.py`` (``read_weights``: its checkpoint verified
against its checksum and config fingerprint) and handed to :func:`load_weights` as ``state``.

Key prefixes: ``module.`` (DataParallel / DDP), ``model.`` (Lightning, a HookedModel) and
``_orig_mod.`` (``torch.compile``) are removed where that makes the keys match the model's
(:func:`match_prefix`). A :class:`~.hooks.HookedModel` is loaded through the module it wraps,
so the same file fits the wrapped and the plain model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

WRAPPERS = ("state_dict", "model")
PREFIXES = ("module.", "model.", "_orig_mod.")
SHOWN = 5  # mismatching keys named in an error
HEAD_CHOICES = ("refuse", "reinit")


def _listed(keys: list[str]) -> str:
    return f"{', '.join(keys[:SHOWN])}{' ...' if len(keys) > SHOWN else ''} ({len(keys)} in all)"


def _read_file(p: Path, key: str):
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{key}: {str(p)!r} is a .safetensors file, which needs the safetensors package "
                              "(pip install 'fairdistill[weights]'); or save the weights as a .pth file.") from None
        try:
            return load_file(str(p))
        except Exception as e:  # the package raises its own error types for a corrupt header
            raise ConfigError(f"{key}: {str(p)!r} is not a readable .safetensors file ({e}).") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code objects, RuntimeError for a bad archive
        raise ConfigError(f"{key}: {str(p)!r} cannot be read with torch.load(weights_only=True) ({e}); "
                          "expected a state dict of tensors (or a checkpoint holding one).") from None


def read_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file or finished run folder (module docstring); ``key`` names
    the config option in errors."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{key}: {str(p)!r} is a folder; this reads weight files (a finished run folder is read, "
                          "verified, by fairdistill.engine.build.read_weights).")
    if not p.is_file():
        raise ConfigError(f"{key}: no file {str(p)!r}; expected a state dict file (.pth/.pt read with "
                          "torch.load(weights_only=True), or .safetensors) or a finished run folder.")
    state = _read_file(p, key)
    for wrapper in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {str(p)!r} does not hold a state dict (a mapping of names to tensors, possibly "
                          "under 'state_dict' or 'model').")
    return dict(state)


def match_prefix(state: dict[str, torch.Tensor], own: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` with the key prefixes (:data:`PREFIXES`, stacked) removed that give the most
    keys in ``own``, and the removed prefix ('' for none)."""
    best, best_prefix = state, ""
    score = len(own.intersection(state))
    current, removed = state, ""
    while True:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in current)), None)
        if prefix is None:
            return best, best_prefix
        current = {k[len(prefix):]: v for k, v in current.items()}
        removed += prefix
        hits = len(own.intersection(current))
        if hits > score:
            best, best_prefix, score = current, removed, hits


def _target(model: nn.Module) -> nn.Module:
    from .hooks import HookedModel

    return model.model if isinstance(model, HookedModel) else model


def load_weights(model: nn.Module, path: str | Path, key: str = "model.weights", num_classes: int | None = None,
                 head: str = "refuse", state: dict[str, torch.Tensor] | None = None) -> dict:
    """Copy the weights of ``path`` (or ``state``, the tensors already read from it) into
    ``model``; return what was loaded and left out.

    Every model key must come from the file (BatchNorm ``num_batches_tracked`` counters may be
    absent) and the file may hold no other key, with equal shapes; otherwise a ConfigError
    names the mismatching keys. The classifier head is the exception with ``head="reinit"``:
    keys whose tensor in the model has ``num_classes`` rows and in the file another shape (or
    that the file lacks) are dropped, and the model keeps its freshly initialised head.

    Returns ``{"source", "prefix_removed", "loaded" (count), "left_out" (file keys not
    loaded), "reinitialised" (model keys kept at their initial values)}``, for result.json.
    """
    if head not in HEAD_CHOICES:
        raise ConfigError(f"{key}_head: expected one of {', '.join(HEAD_CHOICES)}, got {head!r}")
    target = _target(model)
    own = target.state_dict()
    state, prefix = match_prefix(read_state_dict(path, key) if state is None else dict(state), set(own))
    counters = [k for k in own if k not in state and k.endswith("num_batches_tracked")]
    missing = [k for k in own if k not in state and k not in counters]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]

    def is_head(k: str) -> bool:
        t = own[k]
        return num_classes is not None and t.dim() >= 1 and t.shape[0] == num_classes

    dropped: list[str] = []
    if head == "reinit":
        dropped = [k for k in shapes if is_head(k)]
        kept_missing = [k for k in missing if is_head(k)]
        shapes = [k for k in shapes if k not in dropped]
        missing = [k for k in missing if k not in kept_missing]
    else:
        kept_missing = []
    problems = [f"{what}: {_listed(keys)}" for what, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("shape mismatches", [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                              for k in shapes])) if keys]
    if problems:
        hint = ""
        if head == "refuse" and any(is_head(k) for k in shapes + missing):
            hint = (f" The classifier head does not fit the data's {num_classes} classes: set {key}_head=reinit to "
                    "drop it from the file and start it afresh.")
        raise ConfigError(f"{key}: weights do not fit the {type(target).__name__}: {str(path)!r} has "
                          + "; ".join(problems) + "." + hint)
    loaded = {k: v for k, v in state.items() if k in own and k not in dropped}
    target.load_state_dict({**own, **loaded}, strict=True)
    return {"source": str(path), "prefix_removed": prefix, "loaded": len(loaded),
            "left_out": sorted(k for k in state if k not in loaded), "reinitialised": sorted(dropped + kept_missing)}


def load_backbone_weights(module: nn.Module, path: str | Path, ignore: tuple[str, ...] = (),
                          key: str = "model.options.backbone_weights") -> None:
    """Copy a torchvision-format ImageNet file into backbone ``module``, key for key and shape
    for shape, after dropping the keys that start with a prefix in ``ignore`` (the classifier:
    ``fc.``, ``classifier.``). A mismatch is a ConfigError naming the first mismatching keys."""
    own = module.state_dict()
    state, _ = match_prefix(read_state_dict(path, key), set(own))
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{what}: {_listed(keys)}" for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                             ("shape mismatches", shapes)) if keys]
    if problems:
        raise ConfigError(f"{key}: {str(path)!r} does not match the {type(module).__name__} backbone; "
                          + "; ".join(problems) + ". Expected a torchvision-format ImageNet state dict of "
                          "the same architecture.")
    module.load_state_dict({**own, **state}, strict=True)
