"""The on-device batch pipeline of classification: sample, gather, scale to [0, 1], augment,
normalise. Sampling and the process share are :class:`~.batches.EpochPlan`'s; the augmentation
parameters are drawn from the same epoch generator, after the order."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import ConfigError
from .augment import CropSpec, apply_crop, crop_flip, draw_boxes, draw_params
from .base import ImageDataset
from .batches import EpochPlan, epoch_generator

__all__ = ["BatchLoader", "epoch_generator"]


class BatchLoader(EpochPlan):
    """Batches ``(x, y, g)`` of ``dataset`` on ``device``.

    x: float32 (b, C, H, W), scaled to [0, 1], augmented, then normalised with the dataset's
    ``mean``/``std`` when it has them. y, g: int64 (b,).

    Augmentation: ``crop`` (a :class:`~fairdistill.data.augment.CropSpec` or its config form,
    e.g. ``"random_resized:224"``, ``{"kind": "center", "size": 224}``; None = no crop) crops
    every image to ``crop.size`` squares, reflect-padded by ``padding`` first for kind
    ``random``; without a crop, ``padding`` > 0 is a reflect-pad + random crop back to H x W
    (OFD's CIFAR recipe). ``flip``: random horizontal flip. Without ``crop`` the batches and the
    random stream are exactly those of the loader before crops existed. ``crop_key`` names the
    config key in crop errors. ``batch_size`` is per process; the global batch holds
    ``batch_size * world_size`` rows, and the balanced sampler's per-cell quota is computed from
    the global batch. ``drop_last=True`` drops the last, smaller global batch; with
    ``drop_last=False`` every row is delivered (evaluation must see every item), so when that last
    batch has fewer rows than processes some processes get an empty (0-row) batch in the last
    step. Every process yields ``len(loader)`` batches, so collective calls stay in step.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        sampler: str = "uniform",
        drop_last: bool = False,
        padding: int = 0,
        flip: bool = False,
        crop: CropSpec | str | dict | None = None,
        crop_key: str = "crop",
        device: str | torch.device = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        h, w = dataset.image_shape[1:]
        if not 0 <= int(padding) < min(h, w):
            raise ConfigError(
                f"padding must be in 0..{min(h, w) - 1} (reflect padding of {h}x{w} images of {dataset.name}), got {padding!r}"
            )
        self.crop = CropSpec.parse(crop, crop_key)
        self.crop.check(h, w, int(padding), dataset.name, crop_key)
        super().__init__(dataset, batch_size, sampler=sampler, drop_last=drop_last, seed=seed, rank=rank,
                         world_size=world_size, num_labels=dataset.num_classes)
        self.padding, self.flip = int(padding), bool(flip)
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device).contiguous()
        self.labels = dataset.labels.to(self.device)
        self.groups = dataset.groups.to(self.device)
        self.mean = self.std = None
        if dataset.mean is not None:
            self.mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this loader yields (after the crop)."""
        c, h, w = self.dataset.image_shape
        return (c, *self.crop.output_hw(h, w))

    def indices(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's global index order and augmentation parameters, on the CPU: without a
        crop, offsets (n, 2) (top, left in the padded image) and flips (n,); with one, boxes
        (n, 4) (top, left, height, width in stored-image pixels) and flips (n,). Drawn in this
        order from ``epoch_generator(seed, epoch)``: the sampler's order, then the crop's
        parameters (``augment.draw_params`` or ``augment.draw_boxes``), then the flips."""
        gen = epoch_generator(self.seed, epoch)
        order = self.order(gen)
        if self.crop.kind == "none":
            offsets, flips = draw_params(order.numel(), self.padding, self.flip, gen)
        else:
            h, w = self.dataset.image_shape[1:]
            offsets, flips = draw_boxes(self.crop, order.numel(), h, w, self.padding, self.flip, gen)
        return order, offsets, flips

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield this process's ``(x, y, g)`` batches of epoch ``epoch``."""
        order, offsets, flips = self.indices(epoch)
        for start, stop in self.global_batches():
            rows = self.rows(start, stop)
            idx = order[rows].to(self.device)
            if self.crop.kind != "none":
                x = apply_crop(self.images, self.crop, offsets[rows], flips[rows], index=idx).div_(255.0)
            else:
                x = self.images[idx].float().div_(255.0)
                if self.padding or self.flip:
                    x = crop_flip(x, offsets[rows], flips[rows], self.padding)
            if self.mean is not None:
                x = (x - self.mean) / self.std
            yield x, self.labels[idx], self.groups[idx]
