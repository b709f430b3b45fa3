"""The on-device batch pipeline: sample, gather, scale to [0, 1], augment, normalise.

One process, or each of ``world_size`` processes, builds the same *global* batch (indices and
augmentation parameters, all drawn from a CPU generator seeded from ``(seed, epoch)``) and keeps
its rows ``rank::world_size``. Two processes with ``batch_size=64`` therefore see exactly the rows
one process with ``batch_size=128`` sees, and any epoch can be replayed on its own (exact resume).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..errors import ConfigError
from .augment import CropSpec, apply_crop, crop_flip, draw_boxes, draw_params
from .base import ImageDataset
from .samplers import balanced_indices, balanced_quota, check_sampler, sequential_indices, uniform_indices


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``(seed, epoch)``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class BatchLoader:
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
        self.sampler = check_sampler(sampler)
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ConfigError(f"rank must be in 0..world_size-1 with world_size >= 1, got rank={rank}, world_size={world_size}")
        h, w = dataset.image_shape[1:]
        if not 0 <= int(padding) < min(h, w):
            raise ConfigError(
                f"padding must be in 0..{min(h, w) - 1} (reflect padding of {h}x{w} images of {dataset.name}), got {padding!r}"
            )
        self.crop = CropSpec.parse(crop, crop_key)
        self.crop.check(h, w, int(padding), dataset.name, crop_key)
        self.dataset = dataset
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)
        self.padding, self.flip = int(padding), bool(flip)
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.global_batch = self.batch_size * self.world_size
        self.images = dataset.images.to(self.device).contiguous()
        self.labels = dataset.labels.to(self.device)
        self.groups = dataset.groups.to(self.device)
        self.mean = self.std = None
        if dataset.mean is not None:
            self.mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.epoch_size = self._epoch_size()
        if self.epoch_size == 0 and len(dataset):
            quota = balanced_quota(self.global_batch, dataset.num_classes, dataset.num_groups)
            raise ConfigError(
                f"sampler 'balanced': the largest (group, label) cell of {dataset.name} has "
                f"{int(dataset.cell_counts().max())} items, fewer than the per-cell quota {quota} = "
                f"batch {self.global_batch} // {dataset.num_groups * dataset.num_classes} cells; use a smaller batch_size"
            )

    def _epoch_size(self) -> int:
        """Indices the sampler gives per epoch (all processes together)."""
        if self.sampler != "balanced":
            return len(self.dataset)
        counts = self.dataset.cell_counts().flatten()
        counts = counts[counts > 0]
        if not counts.numel():
            return 0
        quota = balanced_quota(self.global_batch, self.dataset.num_classes, self.dataset.num_groups)
        return int(counts.max()) // quota * quota * counts.numel()

    def _global_batches(self) -> list[tuple[int, int]]:
        """(start, stop) of each global batch within the epoch's index order."""
        full, rest = divmod(self.epoch_size, self.global_batch)
        bounds = [(i * self.global_batch, (i + 1) * self.global_batch) for i in range(full)]
        if rest and not self.drop_last:
            bounds.append((full * self.global_batch, self.epoch_size))
        return bounds

    def __len__(self) -> int:
        return len(self._global_batches())

    @property
    def num_samples(self) -> int:
        """Rows this process receives per epoch (the sum of its batch sizes)."""
        return sum(len(range(start + self.rank, stop, self.world_size)) for start, stop in self._global_batches())

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
        n = len(self.dataset)
        if self.sampler == "uniform":
            order = uniform_indices(n, gen)
        elif self.sampler == "sequential":
            order = sequential_indices(n)
        else:
            ds = self.dataset
            order = balanced_indices(ds.labels, ds.groups, ds.num_classes, ds.num_groups, self.global_batch, gen)
        if self.crop.kind == "none":
            offsets, flips = draw_params(order.numel(), self.padding, self.flip, gen)
        else:
            h, w = self.dataset.image_shape[1:]
            offsets, flips = draw_boxes(self.crop, order.numel(), h, w, self.padding, self.flip, gen)
        return order, offsets, flips

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield this process's ``(x, y, g)`` batches of epoch ``epoch``."""
        order, offsets, flips = self.indices(epoch)
        for start, stop in self._global_batches():
            rows = slice(start + self.rank, stop, self.world_size)
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
