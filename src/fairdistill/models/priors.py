"""SSD default boxes ("priors") in ssd.pytorch's layout (Liu et al. 2016, §2.2 "Choosing scales
and aspect ratios"; geometry of amdegroot/ssd.pytorch ``data/config.py`` and ``layers/functions/
prior_box.py``, reference dense.md §2).

For map k of side f_k with step s_k (pixels of the ``image_size`` input per cell), the cell at
row i, column j has centre ((j + 0.5) / (image_size / s_k), (i + 0.5) / (image_size / s_k)) and
these boxes, in this order, all as fractions of the image:

1. a square of side ``min_sizes[k] / image_size`` = s;
2. a square of side sqrt(s * ``max_sizes[k] / image_size``);
3. for each aspect ratio r of ``aspect_ratios[k]``: (w, h) = (s sqrt(r), s / sqrt(r)), then the
   swapped (s / sqrt(r), s sqrt(r)).

Priors run over maps, then rows, then columns, then the box kinds above, which is the order of
a head's (B, A * 4, H, W) output after ``permute(0, 2, 3, 1)``. With ``clip`` every (cx, cy, w, h)
value is clamped to [0, 1] (ssd.pytorch clamps the centre-size form, not the corners).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["PriorConfig", "SSD300_VOC", "prior_boxes"]


@dataclass(frozen=True)
class PriorConfig:
    """Default-box geometry of an SSD; one entry per source map, shallow to deep.

    image_size:    side of the square input, pixels.
    feature_maps:  side of each source map for that input.
    steps:         input pixels per map cell (sets the box centres).
    min_sizes:     side of the small square box, pixels.
    max_sizes:     with ``min_sizes`` gives the second square, side sqrt(min * max), pixels.
    aspect_ratios: ratios r > 1 per map; each adds the boxes r and 1/r.
    clip:          clamp every (cx, cy, w, h) value to [0, 1].
    """

    image_size: int
    feature_maps: tuple[int, ...]
    steps: tuple[float, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    clip: bool = True

    def __post_init__(self) -> None:
        n = len(self.feature_maps)
        for key in ("steps", "min_sizes", "max_sizes", "aspect_ratios"):
            if len(getattr(self, key)) != n:
                raise ConfigError(
                    f"priors.{key}: {len(getattr(self, key))} entries for {n} feature maps; give one per map."
                )
        if self.image_size <= 0 or any(f <= 0 for f in self.feature_maps) or any(s <= 0 for s in self.steps):
            raise ConfigError("priors: image_size, feature_maps and steps must be positive.")
        for k, (lo, hi) in enumerate(zip(self.min_sizes, self.max_sizes)):
            if not 0 < lo <= hi:
                raise ConfigError(f"priors: map {k} needs 0 < min_size <= max_size, got {lo} and {hi}.")
        if any(r <= 0 for ratios in self.aspect_ratios for r in ratios):
            raise ConfigError("priors.aspect_ratios: every ratio must be positive.")

    def boxes_per_location(self) -> list[int]:
        """Boxes per map cell: 2 squares + 2 per aspect ratio (4 or 6 for SSD300)."""
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def num_priors(self) -> int:
        return sum(f * f * a for f, a in zip(self.feature_maps, self.boxes_per_location()))


SSD300_VOC = PriorConfig(
    image_size=300,
    feature_maps=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    min_sizes=(30, 60, 111, 162, 213, 264),
    max_sizes=(60, 111, 162, 213, 264, 315),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)
"""ssd.pytorch's ``voc`` configuration: 8732 priors."""


def prior_boxes(cfg: PriorConfig) -> torch.Tensor:
    """All default boxes of ``cfg`` as a float32 (P, 4) tensor of normalised (cx, cy, w, h).

    Computed in float64 and rounded once, as ssd.pytorch builds them from Python floats.
    """
    maps = []
    for k, f in enumerate(cfg.feature_maps):
        cells = cfg.image_size / cfg.steps[k]
        s = cfg.min_sizes[k] / cfg.image_size
        sizes = [(s, s), (math.sqrt(s * cfg.max_sizes[k] / cfg.image_size),) * 2]
        for r in cfg.aspect_ratios[k]:
            sizes += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
        centre = (torch.arange(f, dtype=torch.float64) + 0.5) / cells
        cy, cx = torch.meshgrid(centre, centre, indexing="ij")
        wh = torch.tensor(sizes, dtype=torch.float64)  # (A, 2)
        a = wh.shape[0]
        grid = torch.stack([cx, cy], -1)[:, :, None, :].expand(f, f, a, 2)
        maps.append(torch.cat([grid, wh.expand(f, f, a, 2)], -1).reshape(-1, 4))
    priors = torch.cat(maps)
    if cfg.clip:
        priors = priors.clamp(0, 1)
    return priors.float()
