"""SSD300 training augmentation, per image, on tensors (Liu et al. 2016, "SSD", §2.2).

The recipe and its numbers are those of the widely used SSD300 implementation
(ssd.pytorch ``SSDAugmentation``), in its order:

1. **Photometric distortion** (``draw_photometric`` / ``photometric``): brightness + U(-32, 32)
   (p 0.5); then, in one of two orders chosen with p 0.5, contrast x U(0.5, 1.5) (p 0.5) either
   before or after the HSV operations: saturation x U(0.5, 1.5) (p 0.5) and hue + U(-18, 18)
   degrees (p 0.5); last a random permutation of the three channels (p 0.5). Pixels are in
   [0, 255] units as there. Values are clamped to [0, 255] after brightness and contrast and the
   saturation to [0, 1] (ssd.pytorch's later revision leaves them unclamped; an earlier one
   clamps as here), so the HSV conversion stays well-defined.
2. **Expand** (zoom out; ``draw_expand``): with p 0.5 the image is placed on a canvas
   ``r`` times its size, r ~ U(1, ``max_expand`` = 4), at the integer offset
   (int(U(0, r w - w)), int(U(0, r h - h))); the canvas is filled with the data set mean.
3. **IoU-constrained random crop** (``draw_crop`` / ``crop_boxes``): a mode is drawn uniformly
   from keep (no crop), min IoU 0.1, 0.3, 0.5, 0.7, 0.9 and any (no IoU constraint); a mode gets
   up to 50 trials of a crop with w ~ U(0.3 W, W), h ~ U(0.3 H, H), aspect h / w in [0.5, 2]
   and a uniform position, rounded down to integer pixels; when all trials of a mode fail, a new
   mode is drawn (as there; keep ends it). A crop is accepted when some box whose centre lies
   strictly inside it has IoU >= the mode's minimum with it (any such box, for "any"); the
   boxes whose centre lies inside are kept, clipped to the crop and shifted to its origin. This
   is the rule of the SSD authors' Caffe sampler (a crop qualifies when an object meets the
   minimum overlap), in torchvision's ``RandomIoUCrop`` form (the box must also be kept).
   ssd.pytorch tests ``overlap.min() < min_iou and max_iou < overlap.max()``, which with
   ``max_iou = inf`` never rejects a crop; mmdetection requires every box to meet the minimum,
   which images with several spread-out objects almost never allow at 0.3 and above. An image
   without boxes accepts the first crop of the right shape.
4. **Horizontal flip** (p 0.5): x -> W - x, so (x1, x2) -> (W - x2, W - x1).
5. **Resize** to ``size`` x ``size`` (300 for SSD300, 64 for the embedded set), bilinear
   without antialiasing (OpenCV's INTER_LINEAR, which ssd.pytorch uses), boxes scaled per axis.

Boxes are (x1, y1, x2, y2) in continuous pixel coordinates (``fairdistill.ops.boxes``). Every
random number comes from the given CPU ``torch.Generator``, drawn a few tensors at a time, so a
(seed, epoch) generator replays the same augmentation on any device. Expand, crop, flip and
resize are one bilinear sampling of the image (``render``) that reads only the output's pixels,
so a 4x zoom-out costs no more than none; the photometric distortion works on the image as
stored, before any geometry, as in the recipe.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..ops.boxes import box_iou
from .images import IMAGENET_MEAN

BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0
"""Degrees, on a hue circle of 360."""
PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)
CROP_TRIALS = 50
CROP_MIN_SCALE = 0.3
CROP_ASPECT = (0.5, 2.0)
"""Bounds of a crop's h / w (in pixels)."""
MAX_EXPAND = 4.0
DEFAULT_FILL = tuple(255.0 * m for m in IMAGENET_MEAN)


# --------------------------------------------------------------------------- colour space
# The hexcone model (``colorsys``; OpenCV's float conversion): value v = max, chroma d = max - min,
# saturation s = d / v, hue in sextants h6 = hue / 60 in [0, 6). Back: every channel is
# c = v - d (1 - t_c) with t_R = clamp(|h6 - 3| - 1), t_G = clamp(2 - |h6 - 2|),
# t_B = clamp(2 - |h6 - 4|), clamped to [0, 1].
def hue_value_chroma(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h6, v, d) of an RGB image (3, H, W): hue in sextants [0, 6), value, chroma (units of x)."""
    r, g, b = x.unbind(0)
    v = x.amax(0)
    d = v - x.amin(0)
    h6 = torch.where(v == r, g - b, torch.where(v == g, 2.0 * d + b - r, 4.0 * d + r - g))
    return (h6 / d.clamp(min=1e-12)).remainder_(6.0), v, d


def from_hue_value_chroma(h6: torch.Tensor, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The RGB image (3, H, W) of hue ``h6`` (sextants, [0, 6)), value ``v`` and chroma ``d``."""
    centre = torch.tensor([3.0, 2.0, 4.0], dtype=h6.dtype, device=h6.device).view(3, 1, 1)
    sign = torch.tensor([1.0, -1.0, -1.0], dtype=h6.dtype, device=h6.device).view(3, 1, 1)
    offset = torch.tensor([-1.0, 2.0, 2.0], dtype=h6.dtype, device=h6.device).view(3, 1, 1)
    t = (h6.unsqueeze(0) - centre).abs_().mul_(sign).add_(offset).clamp_(0.0, 1.0)
    return v.unsqueeze(0) - d.unsqueeze(0) * (1.0 - t)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in degrees [0, 360), saturation in [0, 1], value (units of ``x``) of RGB ``x`` (3, H, W)."""
    h6, v, d = hue_value_chroma(x)
    return h6 * 60.0, torch.where(v > 0, d / v.clamp(min=1e-12), torch.zeros_like(v)), v


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_hsv``."""
    return from_hue_value_chroma((h / 60.0).remainder(6.0), v, v * s)


def saturate(x: torch.Tensor, factor: float) -> torch.Tensor:
    """RGB ``x`` (3, H, W) with its saturation scaled by ``factor`` and clamped to 1, hue and value
    kept, without the round trip: chroma d -> min(factor d, v), so c' = v - (v - c) d' / d,
    i.e. c' = v - (v - c) min(factor, v / d) (``x`` itself where d = 0)."""
    v = x.amax(0, keepdim=True)
    d = v - x.amin(0, keepdim=True)
    gain = torch.clamp(v / d.clamp(min=1e-12), max=factor)
    return v - (v - x) * gain


# --------------------------------------------------------------------------- photometric
@dataclass(frozen=True)
class Photometric:
    """One draw of the photometric distortion; None means "not applied"."""

    brightness: float | None = None
    contrast: float | None = None
    contrast_first: bool = True
    saturation: float | None = None
    hue: float | None = None
    swap: tuple[int, int, int] | None = None


def draw_photometric(generator: torch.Generator) -> Photometric:
    """The photometric parameters of one image: 11 uniforms from ``generator``, always all drawn."""
    u = torch.rand(11, generator=generator, dtype=torch.float64).tolist()

    def between(lo, hi, t):
        return lo + (hi - lo) * t

    return Photometric(
        brightness=between(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA, u[1]) if u[0] < 0.5 else None,
        contrast_first=u[2] < 0.5,
        contrast=between(*CONTRAST_RANGE, u[4]) if u[3] < 0.5 else None,
        saturation=between(*SATURATION_RANGE, u[6]) if u[5] < 0.5 else None,
        hue=between(-HUE_DELTA, HUE_DELTA, u[8]) if u[7] < 0.5 else None,
        swap=PERMUTATIONS[min(int(u[10] * len(PERMUTATIONS)), len(PERMUTATIONS) - 1)] if u[9] < 0.5 else None,
    )


def photometric(image: torch.Tensor, p: Photometric) -> torch.Tensor:
    """``image`` (3, H, W) float in [0, 255] distorted by ``p`` (a new tensor)."""
    if image.shape[0] != 3:
        raise ConfigError(f"SSD augmentation: the photometric distortion needs RGB images, got shape "
                          f"{tuple(image.shape)}; switch it off (photometric=False) for other images")
    x = image.clone()
    if p.brightness is not None:
        x.add_(p.brightness).clamp_(0.0, 255.0)
    if p.contrast is not None and p.contrast_first:
        x.mul_(p.contrast).clamp_(0.0, 255.0)
    if p.saturation is not None and p.hue is None:
        x = saturate(x, p.saturation)
    elif p.hue is not None:
        h6, v, d = hue_value_chroma(x)
        if p.saturation is not None:  # s -> min(f s, 1) is d -> min(f d, v)
            d = torch.minimum(d * p.saturation, v)
        x = from_hue_value_chroma(h6.add_(p.hue / 60.0).remainder_(6.0), v, d).clamp_(0.0, 255.0)
    if p.contrast is not None and not p.contrast_first:
        x.mul_(p.contrast).clamp_(0.0, 255.0)
    if p.swap is not None:
        x = x[list(p.swap)]
    return x


# --------------------------------------------------------------------------- expand + crop
@dataclass(frozen=True)
class Expansion:
    """Where an H x W image sits on its zoom-out canvas: offset (top, left), canvas size."""

    top: int
    left: int
    height: int
    width: int


def draw_expand(height: int, width: int, generator: torch.Generator, max_ratio: float = MAX_EXPAND,
                p: float = 0.5) -> Expansion:
    """The zoom-out of one image (4 uniforms, always drawn): with probability ``p`` a canvas of
    int(r H) x int(r W), r ~ U(1, ``max_ratio``), at offset int(U(0, r H - H)), int(U(0, r W - W));
    else the identity (canvas = image)."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    if u[0] >= p or max_ratio <= 1.0:
        return Expansion(0, 0, height, width)
    r = 1.0 + (max_ratio - 1.0) * u[1]
    return Expansion(int(u[3] * (r * height - height)), int(u[2] * (r * width - width)),
                     int(r * height), int(r * width))


def shift_boxes(boxes: torch.Tensor, left: float, top: float) -> torch.Tensor:
    """``boxes`` (K, 4) moved by (+left, +top)."""
    return boxes + boxes.new_tensor([left, top, left, top])


def centre_inside(boxes: torch.Tensor, rects: torch.Tensor) -> torch.Tensor:
    """(K, T) bool: the centre of box k lies strictly inside crop t; ``rects`` (T, 4) xyxy."""
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2)[:, None]
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2)[:, None]
    return (cx > rects[:, 0]) & (cy > rects[:, 1]) & (cx < rects[:, 2]) & (cy < rects[:, 3])


def crop_candidates(u: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate crops from uniforms ``u`` (T, 4) float64: ``(rects, valid)``, rects (T, 4) xyxy in
    whole pixels, int(left), int(top), int(left + w), int(top + h), with w = W (0.3 + 0.7 u0),
    h = H (0.3 + 0.7 u1), left = u2 (W - w), top = u3 (H - h); valid where h / w lies in [0.5, 2]
    and the rounded crop is not empty."""
    w = width * (CROP_MIN_SCALE + (1.0 - CROP_MIN_SCALE) * u[:, 0])
    h = height * (CROP_MIN_SCALE + (1.0 - CROP_MIN_SCALE) * u[:, 1])
    left, top = u[:, 2] * (width - w), u[:, 3] * (height - h)
    rects = torch.stack([left, top, left + w, top + h], 1).floor_()
    aspect = h / w
    valid = (aspect >= CROP_ASPECT[0]) & (aspect <= CROP_ASPECT[1])
    return rects, valid & (rects[:, 2] > rects[:, 0]) & (rects[:, 3] > rects[:, 1])


def crop_accepts(boxes: torch.Tensor, rects: torch.Tensor, min_iou: float | None) -> torch.Tensor:
    """(T,) bool: crop t meets the mode ``min_iou`` (None: no IoU bound), i.e. some box whose
    centre lies strictly inside it has IoU >= ``min_iou`` with it; all true without boxes."""
    if boxes.shape[0] == 0:
        return torch.ones(rects.shape[0], dtype=torch.bool)
    inside = centre_inside(boxes, rects)
    if min_iou is not None:
        inside &= box_iou(boxes.to(rects.dtype), rects) >= min_iou
    return inside.any(0)


def crop_for_mode(boxes: torch.Tensor, height: int, width: int, min_iou: float | None,
                  u: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The first of the candidate crops given by uniforms ``u`` (T, 4) (``crop_candidates``)
    that is valid and accepted by mode ``min_iou`` (``crop_accepts``), or None."""
    rects, valid = crop_candidates(u, height, width)
    hits = torch.nonzero(valid & crop_accepts(boxes, rects, min_iou)).flatten()
    return tuple(int(v) for v in rects[hits[0]].tolist()) if hits.numel() else None


def draw_crop(boxes: torch.Tensor, height: int, width: int, generator: torch.Generator,
              min_ious: Sequence[float] = MIN_IOUS, trials: int = CROP_TRIALS) -> tuple[int, int, int, int] | None:
    """The crop (x1, y1, x2, y2), integer pixels of an H x W canvas, or None for "keep".

    Modes ("keep", each of ``min_ious``, "any") are drawn uniformly (one ``randint``); a mode
    draws its ``trials`` candidates as one (trials, 4) float64 ``rand`` and takes the first
    valid, accepted one (``crop_for_mode``); if there is none the next mode is drawn.
    """
    modes: list[float | None] = [float(m) for m in min_ious]
    n_modes = len(modes) + 2  # keep, the minima, any
    boxes = boxes.detach().cpu().double()
    while True:
        mode = int(torch.randint(n_modes, (1,), generator=generator).item())
        if mode == 0:
            return None
        min_iou = modes[mode - 1] if mode <= len(modes) else None
        rect = crop_for_mode(boxes, height, width, min_iou,
                             torch.rand(trials, 4, generator=generator, dtype=torch.float64))
        if rect is not None:
            return rect


def crop_boxes(boxes: torch.Tensor, rect: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(boxes, keep)``: the boxes whose centre lies strictly inside ``rect``, clipped to it and
    shifted to its origin, and their positions (int64) in ``boxes``."""
    keep = torch.nonzero(centre_inside(boxes, boxes.new_tensor(rect).view(1, 4))[:, 0]).flatten()
    kept = boxes[keep]
    lo = kept.new_tensor(rect[:2]).repeat(2)
    hi = kept.new_tensor(rect[2:]).repeat(2)
    return torch.minimum(torch.maximum(kept, lo), hi) - lo, keep


def expand_image(image: torch.Tensor, expansion: Expansion, fill: Sequence[float]) -> torch.Tensor:
    """The zoom-out canvas itself: ``image`` (C, H, W) pasted at (top, left) on an
    ``expansion.height`` x ``expansion.width`` canvas of colour ``fill`` (per channel)."""
    c, h, w = image.shape
    out = torch.tensor(list(fill), dtype=image.dtype, device=image.device).view(c, 1, 1)
    out = out.repeat(1, expansion.height, expansion.width)
    out[:, expansion.top:expansion.top + h, expansion.left:expansion.left + w] = image
    return out


def source_coords(lo: int, hi: int, size: int) -> torch.Tensor:
    """Where bilinear resizing of the pixels lo..hi-1 to ``size`` reads, in pixel-centre units:
    (j + 0.5) (hi - lo) / size - 0.5 + lo, clamped to [lo, hi - 1] (as ``F.interpolate`` with
    ``align_corners=False``), float64."""
    scale = (hi - lo) / size
    return ((torch.arange(size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_(0.0, hi - lo - 1) + lo


def render(image: torch.Tensor, expansion: Expansion, rect: tuple[int, int, int, int] | None,
           fill: Sequence[float], size: int, mirror: bool = False) -> torch.Tensor:
    """Expand, crop, flip and resize in one bilinear sampling of ``image`` (C, H, W) float.

    Equals ``resize`` of the crop ``rect`` (None: all) of ``expand_image(image, expansion,
    fill)``, mirrored when ``mirror``, but reads only the ``size`` x ``size`` output positions:
    ``image - fill`` is sampled with zeros outside (``F.grid_sample``), then ``fill`` added back,
    which is the bilinear blend with the fill colour that the canvas gives, since bilinear
    sampling is linear. Mirroring reverses the columns read: half-pixel bilinear resizing is
    symmetric, so flipping before or after it is the same.
    """
    c, h, w = image.shape
    x1, y1, x2, y2 = rect if rect is not None else (0, 0, expansion.width, expansion.height)
    xs = source_coords(x1, x2, size) - expansion.left
    ys = source_coords(y1, y2, size) - expansion.top
    if mirror:
        xs = xs.flip(0)
    # grid_sample's normalised coordinates (align_corners=False): pixel p -> (2 p + 1) / n - 1
    gx = ((2 * xs + 1) / w - 1).to(image.device, torch.float32)
    gy = ((2 * ys + 1) / h - 1).to(image.device, torch.float32)
    grid = torch.stack([gx.expand(size, size), gy[:, None].expand(size, size)], -1).unsqueeze(0)
    f = torch.tensor(list(fill), dtype=image.dtype, device=image.device).view(1, c, 1, 1)
    out = F.grid_sample((image.unsqueeze(0) - f).float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return (out + f).squeeze(0)


# --------------------------------------------------------------------------- flip, resize
def flip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Boxes of an image of ``width`` mirrored left-right: (x1, y1, x2, y2) -> (W - x2, y1, W - x1, y2)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def flip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror ``image`` (C, H, W) left-right, and its ``boxes`` (``flip_boxes``)."""
    return image.flip(-1), flip_boxes(boxes, image.shape[-1])


def scale_boxes(boxes: torch.Tensor, width: float, height: float, size: int) -> torch.Tensor:
    """Boxes of a W x H image in pixels of its ``size`` x ``size`` resize: x (size / W),
    y (size / H), clamped to [0, size] (so float rounding never puts one outside)."""
    scale = boxes.new_tensor([size / width, size / height, size / width, size / height])
    return (boxes * scale).clamp_(0.0, float(size))


def resize(image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` (C, H, W) float bilinearly resized to ``size`` x ``size`` (no antialiasing,
    half-pixel centres, as OpenCV's INTER_LINEAR) and ``boxes`` scaled by (size / W, size / H),
    clamped to [0, size]. This alone is the evaluation transform of SSD."""
    _, h, w = image.shape
    if (h, w) != (size, size):
        image = F.interpolate(image.unsqueeze(0), size=(size, size), mode="bilinear",
                              align_corners=False, antialias=False).squeeze(0)
    return image, scale_boxes(boxes, w, h, size)


# --------------------------------------------------------------------------- the pipeline
class SSDAugmentation:
    """The SSD training augmentation of one image (see the module docstring for the recipe).

    ``size``: output side (300 for SSD300). ``fill``: the expand canvas colour per channel in
    [0, 255] units (the data set mean x 255; default the ImageNet mean). ``photometric``,
    ``expand``, ``crop``, ``flip``: switch the steps on or off (all on in the recipe).
    ``max_expand``: the largest zoom-out ratio (4). ``min_ious``: the crop modes' IoU minima.

    Calling it runs the whole recipe on one image; :meth:`hook` is the same without the flip,
    for ``DenseBatchLoader`` (``DetectionAugment(train=True, size=S, flip=True,
    antialias=False, transform=SSDAugmentation(S, fill=...).hook)``), which flips itself.
    """

    def __init__(self, size: int = 300, fill: Sequence[float] = DEFAULT_FILL, *, photometric: bool = True,
                 expand: bool = True, crop: bool = True, flip: bool = True, max_expand: float = MAX_EXPAND,
                 min_ious: Sequence[float] = MIN_IOUS):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"SSD augmentation: size must be a positive integer (pixels), got {size!r}")
        if not max_expand >= 1.0:
            raise ConfigError(f"SSD augmentation: max_expand must be >= 1 (1 = no zoom-out), got {max_expand!r}")
        if not min_ious or any(not 0.0 <= m <= 1.0 for m in min_ious):
            raise ConfigError(f"SSD augmentation: min_ious must be IoU values in [0, 1], got {list(min_ious)!r}")
        self.size, self.fill = size, tuple(float(f) for f in fill)
        self.photometric, self.expand, self.crop, self.flip = photometric, expand, crop, flip
        self.max_expand, self.min_ious = float(max_expand), tuple(float(m) for m in min_ious)

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator):
        """Augment one image with the whole recipe.

        ``image``: (C, H, W) uint8 (or float in [0, 255]) on any device; ``boxes``: (K, 4)
        float32 xyxy pixels inside the image, on the CPU; ``generator``: a CPU generator.
        Returns ``(x, boxes, keep)``: x float32 (C, size, size) in [0, 1] on the image's device,
        the kept boxes (K', 4) in pixels of x (0 <= x1 < x2 <= size), and ``keep`` (K',) int64,
        their positions in the input, to index labels and difficult flags with.
        """
        x, boxes, keep = self._augment(image.float(), boxes, generator, self.flip)
        return x.div_(255.0).clamp_(0.0, 1.0), boxes, keep

    def hook(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, difficult: torch.Tensor,
             generator: torch.Generator):
        """The recipe without its flip, as ``DetectionAugment.transform`` of ``DenseBatchLoader``:
        ``image`` float32 (C, H, W) in [0, 1] on the loader's device, the targets on the CPU;
        returns ``(x, boxes, labels, difficult)`` with x (C, size, size) in [0, 1], so the
        loader's resize (to the same ``size``) is a no-op and its own random flip (p 0.5) is the
        recipe's flip. Random numbers: photometric, expand, crop draws from ``generator``."""
        x, boxes, keep = self._augment(image * 255.0, boxes, generator, False)
        return x.div_(255.0).clamp_(0.0, 1.0), boxes, labels[keep], difficult[keep]

    def _augment(self, x: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator, flip: bool):
        """``x`` float in [0, 255] (not modified) -> (image in [0, 255] at ``size``, boxes, keep)."""
        boxes = boxes.float()
        keep = torch.arange(boxes.shape[0])
        if len(self.fill) != x.shape[0]:
            raise ConfigError(f"SSD augmentation: fill has {len(self.fill)} values for a {x.shape[0]}-channel image")
        if self.photometric:
            x = photometric(x, draw_photometric(generator))
        _, h, w = x.shape
        expansion = (draw_expand(h, w, generator, self.max_expand) if self.expand else Expansion(0, 0, h, w))
        boxes = shift_boxes(boxes, expansion.left, expansion.top)
        rect = draw_crop(boxes, expansion.height, expansion.width, generator, self.min_ious) if self.crop else None
        if rect is not None:
            boxes, keep = crop_boxes(boxes, rect)
        mirror = flip and torch.rand(1, generator=generator).item() < 0.5
        x = render(x, expansion, rect, self.fill, self.size, mirror)
        width, height = (rect[2] - rect[0], rect[3] - rect[1]) if rect is not None else (expansion.width, expansion.height)
        if mirror:
            boxes = flip_boxes(boxes, width)
        return x, scale_boxes(boxes, width, height, self.size), keep
