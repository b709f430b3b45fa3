"""Batch augmentation on the training device: crops, resized crops and horizontal flips.

Every random parameter is drawn on the CPU from a given ``torch.Generator``, in a fixed order
and amount whatever the outcome (so it is the same on every device, reproducible, and an epoch
can be replayed on its own); the transform itself is one batched operation on the batch's device.

- :func:`draw_params` / :func:`crop_flip`: reflect-pad + random crop back to the input size +
  flip, OFD's CIFAR recipe (``Pad(4, reflect)``, ``RandomCrop(32)``, ``RandomHorizontalFlip``;
  reference ``ofd.md`` §1.7), with the crop taken before the flip (the same distribution, since
  crop offsets are symmetric). A loader without a :class:`CropSpec` does exactly this.
- :class:`CropSpec` with :func:`draw_boxes` / :func:`apply_crop`: torchvision's crops to a
  square ``size``, one box ``(top, left, height, width)`` per image in stored-image pixels:
  ``random`` (RandomCrop, after reflect padding when the loader pads), ``center``
  (CenterCrop), ``resize`` (Resize((size, size))) and ``random_resized`` (RandomResizedCrop;
  the box algorithm is :func:`boxes_from_uniforms`). ``random`` and ``center`` are one gather
  (exact pixel copies); ``resize`` and ``random_resized`` are one ``F.grid_sample`` of the
  whole batch with per-sample sampling grids.

Resampling semantics (``resize``, ``random_resized``): each box is resized to ``size x size``
by bilinear interpolation with ``align_corners=False``, no antialiasing and source coordinates
clamped to the box, i.e. per image
``F.interpolate(img[..., top:top+h, left:left+w], (size, size), mode="bilinear",
align_corners=False)``, then mirrored left-right where flipped. The batched path equals that to
float32 rounding (below 5e-5 of the value range for 256-pixel images: grid_sample's normalised
coordinates carry about 1e-7 relative error).
Against torchvision on PIL images (the official pipelines) it differs in two ways: (1)
Pillow's BILINEAR resize antialiases when it shrinks (its triangle filter widens by the shrink
factor), while here a box side longer than ``size`` is still sampled with 2 taps per axis and
can alias; when enlarging both are the same filter; (2) Pillow computes in uint8 and rounds
after each of its two passes, here the result stays float32.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import suggest

CROP_KINDS = ("none", "random", "center", "resize", "random_resized")
RANDOM_KINDS = ("random", "random_resized")
RESAMPLED_KINDS = ("resize", "random_resized")
SPEC_KEYS = ("kind", "size", "scale", "ratio")
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10
"""Boxes tried per image before RandomResizedCrop's central fallback (torchvision's 10)."""


def draw_params(n: int, padding: int, flip: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU parameters for ``n`` images: crop offsets (n, 2) as (top, left) in ``0..2*padding``,
    and flips (n,) bool, each True with probability 1/2 when ``flip`` (else all False).

    Both are always drawn (offsets all 0 when ``padding == 0``) so that the generator advances
    the same way whatever the options.
    """
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips & flip


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Reflect-pad ``x`` (B, C, H, W) by ``padding``, crop each image back to H x W at its
    ``offsets`` (top, left) and mirror it left-right where ``flips`` is True."""
    b, _, h, w = x.shape
    device = x.device
    offsets, flips = offsets.to(device), flips.to(device)
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding), mode="reflect")
    rows = offsets[:, :1] + torch.arange(h, device=device)  # (B, H)
    cols = torch.arange(w, device=device).expand(b, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols) + offsets[:, 1:]  # (B, W)
    batch = torch.arange(b, device=device)[:, None, None]
    # advanced indices (B,1,1), (B,H,1), (B,1,W) around the channel slice give (B, H, W, C)
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- crop specs


def _pair(value, key: str, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}.{name} must be two numbers [low, high], got {value!r}") from None
    return lo, hi


@dataclass(frozen=True)
class CropSpec:
    """A crop of every image to ``size x size`` (square), as torchvision's transforms.

    - ``none``: no crop (``size`` 0); the loader's reflect ``padding`` and ``flip`` act as before.
    - ``random``: RandomCrop(size): a uniform integer offset per image (in the reflect-padded
      image when the loader has ``padding`` > 0); needs ``size <= side + 2 * padding``.
    - ``center``: CenterCrop(size): offsets ``int(round((side - size) / 2))``; ``size <= side``.
    - ``resize``: Resize((size, size)) of the whole image, bilinear (module docstring).
    - ``random_resized``: RandomResizedCrop(size, scale, ratio): a box of area fraction
      ``U(scale)`` and aspect ratio (width / height) log-uniform in ``ratio``, resized to
      ``size`` (bilinear; :func:`boxes_from_uniforms`).

    ``scale`` and ``ratio`` belong to ``random_resized`` (defaults (0.08, 1) and (3/4, 4/3),
    torchvision's). Config forms: :meth:`parse`.
    """

    kind: str = "none"
    size: int = 0
    scale: tuple[float, float] = DEFAULT_SCALE
    ratio: tuple[float, float] = DEFAULT_RATIO

    def __post_init__(self):
        _check_spec(self.kind, self.size, self.scale, self.ratio, "crop")

    @classmethod
    def parse(cls, value, key: str = "crop", *, deterministic: bool = False) -> "CropSpec":
        """A spec from ``None`` (no crop), a CropSpec, a string ``"KIND"`` / ``"KIND:SIZE"``
        (``"random_resized:224"``, ``"center:224"``, ``"random:176"``) or a mapping
        ``{kind, size, scale, ratio}``. ``deterministic=True`` (evaluation loaders) refuses the
        random kinds. Errors are ConfigErrors naming ``key``."""
        if value is None or isinstance(value, CropSpec):
            spec = value or cls()
        elif isinstance(value, str):
            kind, sep, size = value.strip().partition(":")
            fields: dict = {"kind": kind.strip()}
            if sep:
                try:
                    fields["size"] = int(size)
                except ValueError:
                    raise ConfigError(f"{key}: size in {value!r} must be an integer (pixels), "
                                      "e.g. 'center:224'") from None
            spec = cls._from_fields(fields, key)
        elif isinstance(value, Mapping):
            unknown = [k for k in value if k not in SPEC_KEYS]
            if unknown:
                raise ConfigError(f"{key}: unknown key {unknown[0]!r}.{suggest(unknown[0], SPEC_KEYS)} "
                                  f"Keys: {', '.join(SPEC_KEYS)}")
            kind = value.get("kind", "none")
            if kind != "random_resized" and ("scale" in value or "ratio" in value):
                raise ConfigError(f"{key}: scale and ratio apply to kind random_resized only, got kind {kind!r}")
            spec = cls._from_fields(dict(value), key)
        else:
            raise ConfigError(f"{key}: expected a crop such as 'random_resized:224' or "
                              f"{{kind: center, size: 224}}, got {type(value).__name__} {value!r}")
        if deterministic and spec.is_random:
            raise ConfigError(f"{key}: an evaluation crop must be deterministic (none, center or resize), "
                              f"got {spec.kind!r}")
        return spec

    @classmethod
    def _from_fields(cls, fields: dict, key: str) -> "CropSpec":
        kind = fields.get("kind", "none")
        size = fields.get("size", 0)
        scale = _pair(fields["scale"], key, "scale") if "scale" in fields else DEFAULT_SCALE
        ratio = _pair(fields["ratio"], key, "ratio") if "ratio" in fields else DEFAULT_RATIO
        _check_spec(kind, size, scale, ratio, key)
        return cls(kind, int(size), scale, ratio)

    @property
    def is_random(self) -> bool:
        return self.kind in RANDOM_KINDS

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) of the crops of ``h x w`` images."""
        return (h, w) if self.kind == "none" else (self.size, self.size)

    def check(self, h: int, w: int, padding: int, name: str, key: str = "crop") -> None:
        """ConfigError unless this crop applies to ``h x w`` images of data set ``name`` with
        reflect ``padding`` (only ``none`` and ``random`` take padding)."""
        if padding and self.kind not in ("none", "random"):
            raise ConfigError(f"{key}: kind {self.kind!r} takes no padding (padding={padding}); "
                              "set padding to 0 or use kind random")
        limit = {"random": (h + 2 * padding, w + 2 * padding), "center": (h, w)}.get(self.kind)
        if limit and self.size > min(limit):
            raise ConfigError(
                f"{key}: size {self.size} is larger than the {limit[0]}x{limit[1]} images of {name}"
                f"{' after padding' if padding else ''}; store larger images (the data set's size option) or crop less"
            )

    def fixed(self, h: int, w: int) -> "CropSpec":
        """The deterministic crop of the same output size for ``h x w`` images: itself when
        deterministic, else ``center`` (``resize`` when ``size`` exceeds a side). For shape
        probes and passes over the training set without augmentation."""
        if not self.is_random:
            return self
        return CropSpec("center" if self.size <= min(h, w) else "resize", self.size)

    def as_dict(self) -> dict:
        """The mapping form :meth:`parse` reads back (for configs and logs)."""
        out: dict = {"kind": self.kind, "size": self.size}
        if self.kind == "random_resized":
            out.update(scale=list(self.scale), ratio=list(self.ratio))
        return out


def _check_spec(kind, size, scale, ratio, key: str) -> None:
    if kind not in CROP_KINDS:
        raise ConfigError(f"{key}: unknown crop kind {kind!r}.{suggest(str(kind), CROP_KINDS)} "
                          f"Kinds: {', '.join(CROP_KINDS)}")
    if isinstance(size, bool) or not isinstance(size, int):
        raise ConfigError(f"{key}: size must be an integer (pixels), got {size!r}")
    if kind == "none" and size:
        raise ConfigError(f"{key}: kind none takes no size, got size {size}")
    if kind != "none" and size < 1:
        raise ConfigError(f"{key}: kind {kind} needs a size >= 1 (output side in pixels), got {size!r}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"{key}.scale: need 0 < low <= high <= 1 (area fractions), got {list(scale)}")
    if not 0.0 < ratio[0] <= ratio[1] < math.inf:
        raise ConfigError(f"{key}.ratio: need 0 < low <= high (width / height), got {list(ratio)}")


# ----------------------------------------------------------------------------- boxes


def fallback_box(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box when no attempt fits: the whole image, narrowed to the nearest
    aspect ratio inside ``ratio`` (width ``w`` and height ``round(w / ratio[0])`` for images
    narrower than ``ratio[0]``; height ``h`` and width ``round(h * ratio[1])`` for images wider
    than ``ratio[1]``), centred with offsets ``(side - box) // 2``."""
    lo, hi = min(ratio), max(ratio)
    if w / h < lo:
        bw, bh = w, int(round(w / lo))
    elif w / h > hi:
        bw, bh = int(round(h * hi)), h
    else:
        bw, bh = w, h
    return (h - bh) // 2, (w - bw) // 2, bh, bw


def boxes_from_uniforms(u_scale: torch.Tensor, u_ratio: torch.Tensor, u_pos: torch.Tensor, h: int, w: int,
                        scale: tuple[float, float] = DEFAULT_SCALE,
                        ratio: tuple[float, float] = DEFAULT_RATIO) -> torch.Tensor:
    """RandomResizedCrop boxes (n, 4) int64 ``(top, left, height, width)`` of ``h x w`` images
    from uniforms in [0, 1): ``u_scale``, ``u_ratio`` (n, attempts) and ``u_pos`` (n, 2), float64.

    The algorithm of torchvision's ``RandomResizedCrop.get_params`` (Szegedy et al. 2015's
    Inception crop): attempt k takes area ``h * w * s`` with ``s = scale[0] + (scale[1] -
    scale[0]) * u_scale[:, k]`` and aspect ``r = exp(log ratio[0] + (log ratio[1] - log ratio[0])
    * u_ratio[:, k])``, width ``round(sqrt(area * r))`` and height ``round(sqrt(area / r))``
    (round half to even, as Python's ``round``); the first attempt with ``0 < width <= w`` and
    ``0 < height <= h`` is kept, placed at ``top = floor(u_pos[:, 0] * (h - height + 1))`` and
    ``left = floor(u_pos[:, 1] * (w - width + 1))`` (uniform integers); an image with no such
    attempt gets :func:`fallback_box`. All attempts are computed, so the uniforms consumed do not
    depend on the outcome. (torchvision draws ``s`` and ``log r`` in float32 from its global
    generator; here float64 from the epoch's: the same distribution, another stream.)
    """
    area = float(h) * float(w)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    bw = torch.round(torch.sqrt(target * aspect))
    bh = torch.round(torch.sqrt(target / aspect))
    fits = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # first fitting attempt (0 if none)
    found = fits.any(1)
    bh = bh.gather(1, first)[:, 0].long()
    bw = bw.gather(1, first)[:, 0].long()
    top = torch.minimum((u_pos[:, 0] * (h - bh + 1)).floor().long(), h - bh)
    left = torch.minimum((u_pos[:, 1] * (w - bw + 1)).floor().long(), w - bw)
    fallback = torch.tensor(fallback_box(h, w, ratio), dtype=torch.long)
    boxes = torch.stack([top, left, bh, bw], 1)
    return torch.where(found[:, None], boxes, fallback)


def fixed_box(spec: CropSpec, h: int, w: int) -> tuple[int, int, int, int]:
    """The one box of a deterministic crop: centred ``size`` square (CenterCrop's
    ``int(round((side - size) / 2))`` offsets) or the whole image (``resize``, ``none``)."""
    if spec.kind == "center":
        return int(round((h - spec.size) / 2.0)), int(round((w - spec.size) / 2.0)), spec.size, spec.size
    return 0, 0, h, w


def draw_boxes(spec: CropSpec, n: int, h: int, w: int, padding: int, flip: bool,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU parameters of ``spec`` for ``n`` images of ``h x w``: boxes (n, 4) int64 ``(top,
    left, height, width)`` and flips (n,) bool (True with probability 1/2 when ``flip``).

    Draw order, each drawn in full whatever the options: ``random``: tops
    ``randint(0, h + 2 * padding - size + 1)`` then lefts (both then shifted by ``-padding``:
    boxes may start in the reflect padding); ``random_resized``: ``u_scale`` (n, 10),
    ``u_ratio`` (n, 10), ``u_pos`` (n, 2), float64 (:func:`boxes_from_uniforms`); deterministic
    kinds draw nothing. Then the flips, ``rand(n) < 0.5``.
    """
    if spec.kind == "random":
        top = torch.randint(0, h + 2 * padding - spec.size + 1, (n,), generator=generator) - padding
        left = torch.randint(0, w + 2 * padding - spec.size + 1, (n,), generator=generator) - padding
        side = torch.full((n,), spec.size, dtype=torch.long)
        boxes = torch.stack([top, left, side, side], 1)
    elif spec.kind == "random_resized":
        u_scale = torch.rand(n, ATTEMPTS, generator=generator, dtype=torch.float64)
        u_ratio = torch.rand(n, ATTEMPTS, generator=generator, dtype=torch.float64)
        u_pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        boxes = boxes_from_uniforms(u_scale, u_ratio, u_pos, h, w, spec.scale, spec.ratio)
    else:
        boxes = torch.tensor(fixed_box(spec, h, w), dtype=torch.long).expand(n, 4).clone()
    flips = torch.rand(n, generator=generator) < 0.5
    return boxes, flips & flip


# ----------------------------------------------------------------------------- transforms


def _reflect(pos: torch.Tensor, n: int) -> torch.Tensor:
    """Positions in a reflect-padded axis of length ``n`` (``-1 -> 1``, ``n -> n - 2``; numpy's
    and ``F.pad``'s "reflect"), valid for padding < n."""
    pos = pos.abs()
    return torch.where(pos > n - 1, 2 * (n - 1) - pos, pos)


def crop_gather(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, hw: tuple[int, int],
                index: torch.Tensor | None = None) -> torch.Tensor:
    """Integer crops (B, C, bh, bw), ``(bh, bw) = hw`` (the boxes' common size), of the images
    ``images[index]`` (all of ``images`` (N, C, H, W) when ``index`` is None) at ``boxes[:, :2]``
    (top, left; negative or overhanging positions read the reflect padding), mirrored left-right
    where ``flips``: exact copies, any dtype. The rows are read straight from ``images`` (one
    ``index_select`` of whole rows; no copy of the uncropped batch), then one gather of columns."""
    n, c, h, w = images.shape
    bh, bw = hw
    dev = images.device
    index = torch.arange(n, device=dev) if index is None else index.to(dev)
    b = index.numel()
    boxes, flips = boxes.to(dev), flips.to(dev)
    ar_h, ar_w = torch.arange(bh, device=dev), torch.arange(bw, device=dev)
    rows = _reflect(boxes[:, :1] + ar_h, h)  # (B, bh)
    cols = _reflect(boxes[:, 1:2] + torch.where(flips[:, None], ar_w.flip(0), ar_w), w)  # (B, bw)
    # row r of channel ch of image i is row (i * C + ch) * H + r of images viewed as (N*C*H, W)
    flat = ((index[:, None, None] * c + torch.arange(c, device=dev)[None, :, None]) * h + rows[:, None, :]).reshape(-1)
    x = images.reshape(n * c * h, w).index_select(0, flat)  # (B*C*bh, W)
    x = x.gather(1, cols[:, None, None, :].expand(b, c, bh, bw).reshape(b * c * bh, bw))
    return x.view(b, c, bh, bw)


def _axis(start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
    """Source coordinates (B, size), float32, of the output pixels along one axis: pixel centres
    ``(i + 0.5) * length / size - 0.5`` clamped to ``[0, length - 1]`` (as F.interpolate with
    ``align_corners=False``), plus the box start."""
    scale = (length.float() / size)[:, None]
    src = (torch.arange(size, device=start.device, dtype=torch.float32) + 0.5) * scale - 0.5
    return torch.minimum(src.clamp(min=0.0), (length - 1).float()[:, None]) + start.float()[:, None]


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int, flips: torch.Tensor) -> torch.Tensor:
    """The boxes (top, left, height, width) of ``x`` (B, C, H, W) resized to ``size x size``,
    bilinear (the module docstring's semantics), mirrored where ``flips``: float32
    (B, C, size, size), one ``F.grid_sample`` for the whole batch."""
    b, _, h, w = x.shape
    boxes, flips = boxes.to(x.device), flips.to(x.device)
    ys = _axis(boxes[:, 0], boxes[:, 2], size)
    xs = _axis(boxes[:, 1], boxes[:, 3], size)
    xs = torch.where(flips[:, None], xs.flip(1), xs)
    # grid_sample's pixel of a normalised coordinate g is ((g + 1) * side - 1) / 2
    gx = (2.0 * xs + 1.0) / w - 1.0
    gy = (2.0 * ys + 1.0) / h - 1.0
    grid = torch.stack([gx[:, None, :].expand(b, size, size), gy[:, :, None].expand(b, size, size)], -1)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def apply_crop(images: torch.Tensor, spec: CropSpec, boxes: torch.Tensor, flips: torch.Tensor,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """``spec`` applied with its drawn ``boxes`` and ``flips`` (:func:`draw_boxes`) to the batch
    ``images[index]`` (all of ``images`` (N, C, H, W), any dtype, when ``index`` is None):
    float32 (B, C, S, S) in the units of ``images``. A contiguous ``images`` avoids a copy."""
    if spec.kind in RESAMPLED_KINDS:
        return resized_crop(images if index is None else images[index.to(images.device)], boxes, spec.size, flips)
    return crop_gather(images, boxes, flips, spec.output_hw(images.shape[2], images.shape[3]), index).float()
