"""Joint image + target transforms of the dense batch pipeline, on the training device.

Segmentation, training (the official OFD recipe, reference ``dense.md`` §1.5, in its order):
horizontal flip (p 0.5); RandomScaleCrop: the shorter side goes to a random integer in
``[int(base * lo), int(base * hi)]`` (``scale_range`` = (lo, hi), official (0.5, 2.0), base 513),
the image bilinear and the mask nearest; image and mask padded right/bottom to ``crop_size``
(image 0, i.e. black before normalisation; mask ``mask_pad``: 255 = void here by default, 0 =
background in the official code); a random ``crop_size`` square, its corner uniform over the
valid positions; optionally (``blur``) a Gaussian blur with probability 0.5 and standard
deviation U(0, 1) pixels (official RandomGaussianBlur; ``resample.gaussian_blur``). Evaluation: no randomness; with
``eval_size`` the shorter side is resized to it (official FixedResize 513, mask nearest); a batch
of images of different sizes is padded right/bottom to the largest (image 0, mask 255).

Detection: every image, training or not, is resized to ``size x size`` when ``size`` is set
(SSD's squashing resize; boxes scaled with it); training adds a horizontal flip (p 0.5) and,
before both, the optional hook ``transform(image, boxes, labels, difficult, generator) ->
(image, boxes, labels, difficult)`` for SSD's photometric distortion, expand and IoU crop (see
:class:`DetectionAugment`). Without ``size``, images of different sizes are padded to the
largest (image 0); boxes are unchanged by padding.

All random parameters are drawn on the CPU per row of the epoch's order (``draw_*_params``), so
a row's transform does not depend on which process or batch it lands in. Resampling is
``resample.py``'s matrices: one batched product for same-size images, one per image otherwise.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ..errors import ConfigError
from ..registry import suggest
from .dense import VOID
from .resample import apply_index, apply_weights, axis_index, axis_weights, gaussian_blur, short_side_size


def _check_int(key: str, value, low: int = 1, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}{' or null' if allow_none else ''}, got {value!r}")


def _check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


@dataclass(frozen=True)
class SegmentationAugment:
    """Settings of the segmentation transforms (module docstring).

    ``train``: apply the training transforms (else the evaluation ones). ``crop_size``: side of
    the training crop (None: the shorter side of a same-size data set's images; required when
    sizes vary). ``base_size``: the base of the random scale (None = ``crop_size``).
    ``scale_range``: (lo, hi) multipliers of ``base_size`` for the shorter side ((1, 1) turns
    random scaling off). ``flip``: random horizontal flip. ``blur``: random Gaussian blur.
    ``mask_pad``: mask value of padded pixels, 255 (void) or 0 (background, official).
    ``eval_size``: shorter side of evaluation images (None: original size). ``antialias``:
    Pillow-style antialiased bilinear when shrinking (False: plain bilinear).
    """

    train: bool = False
    crop_size: int | None = None
    base_size: int | None = None
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    blur: bool = False
    mask_pad: int = VOID
    eval_size: int | None = None
    antialias: bool = True

    def __post_init__(self):
        object.__setattr__(self, "scale_range", tuple(self.scale_range) if isinstance(self.scale_range, (list, tuple)) else self.scale_range)
        self.check("augment")

    def check(self, key: str) -> None:
        for name in ("train", "flip", "blur", "antialias"):
            _check_bool(f"{key}.{name}", getattr(self, name))
        for name in ("crop_size", "base_size", "eval_size"):
            _check_int(f"{key}.{name}", getattr(self, name))
        lo_hi = self.scale_range
        if (not isinstance(lo_hi, tuple) or len(lo_hi) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in lo_hi)
                or not 0 < lo_hi[0] <= lo_hi[1] < float("inf")):
            raise ConfigError(f"{key}.scale_range must be two numbers [lo, hi] with 0 < lo <= hi, got {lo_hi!r}")
        if self.mask_pad not in (0, VOID) or isinstance(self.mask_pad, bool):
            raise ConfigError(f"{key}.mask_pad must be 255 (void) or 0 (background, as the official code), got {self.mask_pad!r}")

    def short_range(self, base: int) -> tuple[int, int]:
        """Inclusive range of the random shorter side for base size ``base``."""
        lo, hi = int(base * self.scale_range[0]), int(base * self.scale_range[1])
        return max(lo, 1), max(hi, 1)


@dataclass(frozen=True)
class DetectionAugment:
    """Settings of the detection transforms (module docstring).

    ``train``: apply the training transforms. ``size``: side of the square every image is
    resized to (None: keep sizes). ``flip``: random horizontal flip in training. ``antialias``:
    as :class:`SegmentationAugment`. ``transform``: the training hook, called per image before
    the flip and the resize as ``transform(image, boxes, labels, difficult, generator)`` with
    ``image`` float32 (C, H, W) in [0, 1] on the loader's device (not yet normalised),
    ``boxes`` float32 (K, 4) xyxy in pixels of that image, ``labels`` int64 (K,), ``difficult``
    bool (K,) (all three on the CPU) and ``generator`` a CPU ``torch.Generator`` seeded for this
    row of this epoch (draw every random number from it: that keeps resume and DDP exact). It
    returns the four, possibly with a new image size and fewer boxes.
    """

    train: bool = False
    size: int | None = None
    flip: bool = True
    antialias: bool = True
    transform: Callable | None = None

    def __post_init__(self):
        self.check("augment")

    def check(self, key: str) -> None:
        for name in ("train", "flip", "antialias"):
            _check_bool(f"{key}.{name}", getattr(self, name))
        _check_int(f"{key}.size", self.size)
        if self.transform is not None and not callable(self.transform):
            raise ConfigError(f"{key}.transform must be a callable (image, boxes, labels, difficult, generator), got {self.transform!r}")


AUGMENTS = {"segmentation": SegmentationAugment, "detection": DetectionAugment}


def parse_augment(value, task: str, key: str = "augment"):
    """``value`` (None, a settings object or a mapping of its fields) as the settings of ``task``."""
    cls = AUGMENTS[task]
    if value is None:
        return cls()
    if isinstance(value, cls):
        value.check(key)
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping of {cls.__name__} settings for a {task} data set, got {type(value).__name__}")
    names = [f.name for f in fields(cls)]
    for k in value:
        if k not in names:
            raise ConfigError(f"{key}.{k}: unknown option.{suggest(k, names)} Valid options: {', '.join(names)}.")
    try:
        return cls(**value)
    except ConfigError as err:
        raise ConfigError(str(err).replace("augment.", f"{key}.", 1)) from None


# ----------------------------------------------------------------------------- parameters


def draw_segmentation_params(n: int, short_range: tuple[int, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """CPU parameters of ``n`` rows: ``flip`` (n,) bool, ``short`` (n,) int64 in the inclusive
    ``short_range``, ``offset`` (n, 2) float64 in [0, 1) (crop corner as a share of the valid
    range: top, left), ``blur`` (n,) bool and ``sigma`` (n,) float64 in [0, 1)."""
    flip = torch.rand(n, generator=generator) < 0.5
    short = torch.randint(short_range[0], short_range[1] + 1, (n,), generator=generator)
    offset = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    blur = torch.rand(n, generator=generator) < 0.5
    sigma = torch.rand(n, generator=generator, dtype=torch.float64)
    return {"flip": flip, "short": short, "offset": offset, "blur": blur, "sigma": sigma}


def draw_detection_params(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """CPU parameters of ``n`` rows: ``flip`` (n,) bool and ``seed`` (n,) int64, the seed of the
    generator handed to the transform hook."""
    flip = torch.rand(n, generator=generator) < 0.5
    seed = torch.randint(0, 2**62, (n,), generator=generator)
    return {"flip": flip, "seed": seed}


def crop_geometry(h: int, w: int, short: int, offset: torch.Tensor, crop: int) -> tuple[int, int, int, int]:
    """(scaled h, scaled w, top, left) of one RandomScaleCrop: the corner is
    ``floor(offset * (padded side - crop + 1))`` per axis, padded side = max(scaled side, crop)."""
    oh, ow = short_side_size(h, w, int(short))
    top = int(float(offset[0]) * (max(oh, crop) - crop + 1))
    left = int(float(offset[1]) * (max(ow, crop) - crop + 1))
    return oh, ow, top, left


# ----------------------------------------------------------------------------- segmentation


def _scale_crop(x: torch.Tensor, m: torch.Tensor, geo: torch.Tensor, flip: torch.Tensor, crop: int,
                mask_pad: int, antialias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-size x (B, C, H, W) float, m (B, H, W) with per-row geometry (B, 4) -> crops."""
    h, w = x.shape[-2:]
    dev = x.device
    rows = axis_weights(h, geo[:, 0], geo[:, 2], crop, antialias=antialias, device=dev)
    cols = axis_weights(w, geo[:, 1], geo[:, 3], crop, flip=flip, antialias=antialias, device=dev)
    ri = axis_index(h, geo[:, 0], geo[:, 2], crop, device=dev)
    ci = axis_index(w, geo[:, 1], geo[:, 3], crop, flip=flip, device=dev)
    return apply_weights(x, rows, cols), apply_index(m, ri, ci, mask_pad)


def segmentation_train(images, masks, params: dict, aug: SegmentationAugment, crop: int,
                       device) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch of segmentation rows: x float32 (B, C, crop, crop) in [0, 1] (before
    normalisation) and y int64 (B, crop, crop). ``images``/``masks``: a uint8 batch tensor on
    ``device`` (same sizes) or lists of per-image uint8 tensors."""
    flip = params["flip"] & aug.flip
    sizes = [tuple(im.shape[-2:]) for im in images]
    geo = torch.tensor([crop_geometry(h, w, s, o, crop) for (h, w), s, o in zip(sizes, params["short"], params["offset"])],
                       dtype=torch.long).view(-1, 4)
    if isinstance(images, torch.Tensor):
        x, y = _scale_crop(images.float().div_(255.0), masks, geo, flip, crop, aug.mask_pad, aug.antialias)
    elif len(images):
        parts = [_scale_crop(im.to(device)[None].float().div_(255.0), m.to(device)[None], geo[i:i + 1], flip[i:i + 1],
                             crop, aug.mask_pad, aug.antialias) for i, (im, m) in enumerate(zip(images, masks))]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    else:
        return torch.zeros(0, 3, crop, crop, device=device), torch.zeros(0, crop, crop, dtype=torch.long, device=device)
    if aug.blur:
        blur = (params["blur"]).to(device)
        if blur.any():
            x[blur] = gaussian_blur(x[blur], params["sigma"][params["blur"]])
    return x, y.long()


def resize_short(x: torch.Tensor, m: torch.Tensor | None, short: int, antialias: bool):
    """x (B, C, H, W) float and masks (B, H, W) with the shorter side resized to ``short``."""
    h, w = x.shape[-2:]
    oh, ow = short_side_size(h, w, short)
    if (oh, ow) == (h, w):
        return x, m
    dev, zero = x.device, torch.zeros(1, dtype=torch.long)
    rows = axis_weights(h, torch.tensor([oh]), zero, oh, antialias=antialias, device=dev).expand(len(x), -1, -1)
    cols = axis_weights(w, torch.tensor([ow]), zero, ow, antialias=antialias, device=dev).expand(len(x), -1, -1)
    x = apply_weights(x, rows, cols)
    if m is not None:
        ri = axis_index(h, torch.tensor([oh]), zero, oh, device=dev).expand(len(x), -1)
        ci = axis_index(w, torch.tensor([ow]), zero, ow, device=dev).expand(len(x), -1)
        m = apply_index(m, ri, ci, VOID)
    return x, m


def pad_to(x: torch.Tensor, h: int, w: int, value: float) -> torch.Tensor:
    """Pad the last two dimensions of x right/bottom to (h, w) with ``value``."""
    return torch.nn.functional.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]), value=value)


def segmentation_eval(images, masks, aug: SegmentationAugment, device, empty_shape: tuple[int, int, int]):
    """Evaluation batch: optional shorter-side resize, then right/bottom padding to the largest
    image of the batch (image 0, mask 255). ``empty_shape`` (C, H, W) shapes a 0-row batch."""
    if isinstance(images, torch.Tensor):
        x, y = images.float().div_(255.0), masks
        if aug.eval_size:
            x, y = resize_short(x, y, aug.eval_size, aug.antialias)
        return x, y.long()
    if not len(images):
        c, h, w = empty_shape
        return torch.zeros(0, c, h, w, device=device), torch.zeros(0, h, w, dtype=torch.long, device=device)
    xs, ys = [], []
    for im, m in zip(images, masks):
        x, y = im.to(device)[None].float().div_(255.0), m.to(device)[None]
        if aug.eval_size:
            x, y = resize_short(x, y, aug.eval_size, aug.antialias)
        xs.append(x)
        ys.append(y)
    h, w = max(x.shape[-2] for x in xs), max(x.shape[-1] for x in xs)
    x = torch.cat([pad_to(x, h, w, 0.0) for x in xs])
    y = torch.cat([pad_to(y, h, w, VOID) for y in ys])
    return x, y.long()


# ----------------------------------------------------------------------------- detection


def _check_hook_output(out, key: str = "augment.transform"):
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise ConfigError(f"{key} must return (image, boxes, labels, difficult), got {type(out).__name__}")
    image, boxes, labels, difficult = out
    k = boxes.shape[0] if isinstance(boxes, torch.Tensor) and boxes.dim() == 2 else -1
    if (not isinstance(image, torch.Tensor) or image.dim() != 3 or k < 0 or boxes.shape[1] != 4
            or tuple(labels.shape) != (k,) or tuple(difficult.shape) != (k,)):
        raise ConfigError(f"{key} returned an image or targets of the wrong shape; expected image (C, H, W), "
                          f"boxes (K, 4), labels (K,), difficult (K,)")
    return image, boxes.float(), labels.long(), difficult.bool()


def detection_batch(images, boxes, labels, difficult, params: dict, aug: DetectionAugment, device,
                    empty_shape: tuple[int, int, int]):
    """Detection batch: x float32 (B, C, H, W) in [0, 1] (before normalisation) and a list of B
    target dicts ``{"boxes", "labels", "difficult"}`` on ``device``, boxes xyxy in pixels of x."""
    flips = (params["flip"] & (aug.flip and aug.train)).tolist()
    hook = aug.transform if aug.train else None
    xs, targets = [], []
    batched = isinstance(images, torch.Tensor) and hook is None
    if batched and len(images):
        x = images.float().div_(255.0)
        h, w = x.shape[-2:]
        if aug.size and (h, w) != (aug.size, aug.size):
            zero, s = torch.zeros(1, dtype=torch.long), torch.tensor([aug.size])
            rows = axis_weights(h, s, zero, aug.size, antialias=aug.antialias, device=x.device).expand(len(x), -1, -1)
            cols = axis_weights(w, s, zero, aug.size, antialias=aug.antialias, device=x.device).expand(len(x), -1, -1)
            x = apply_weights(x, rows, cols)
        flip = torch.tensor(flips, dtype=torch.bool, device=x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        sizes = [(h, w)] * len(x)
    for i in range(len(images)):
        b, lab, dif = boxes[i].clone(), labels[i], difficult[i]
        if batched:
            h, w = sizes[i]
        else:
            im = images[i].to(device).float().div_(255.0)
            if hook is not None:
                gen = torch.Generator().manual_seed(int(params["seed"][i]))
                im, b, lab, dif = _check_hook_output(hook(im, b, lab, dif, gen))
            h, w = im.shape[-2:]
            if aug.size and (h, w) != (aug.size, aug.size):
                zero, s = torch.zeros(1, dtype=torch.long), torch.tensor([aug.size])
                rows = axis_weights(h, s, zero, aug.size, antialias=aug.antialias, device=im.device)
                cols = axis_weights(w, s, zero, aug.size, antialias=aug.antialias, device=im.device)
                im = apply_weights(im[None], rows, cols)[0]
            if flips[i]:
                im = im.flip(-1)
            xs.append(im)
        if aug.size:
            b = b * torch.tensor([aug.size / w, aug.size / h] * 2, dtype=torch.float32)
            w_out = aug.size
        else:
            w_out = w
        if flips[i]:
            b = torch.stack([w_out - b[:, 2], b[:, 1], w_out - b[:, 0], b[:, 3]], 1)
        targets.append({"boxes": b.to(device), "labels": lab.to(device), "difficult": dif.to(device)})
    if batched and len(images):
        return x, targets
    if not xs:
        c, h, w = empty_shape
        return torch.zeros(0, c, h, w, device=device), targets
    h, w = max(x.shape[-2] for x in xs), max(x.shape[-1] for x in xs)
    return torch.stack([pad_to(x, h, w, 0.0) for x in xs]), targets
