"""The dense data contract: images with a segmentation mask or boxes per image, and a group.

A :class:`DenseDataset` is the dense counterpart of :class:`~fairdistill.data.base.ImageDataset`:
everything in memory, uint8 images, one group (sensitive attribute) per image, plus an
image-level ``labels`` tensor that only the samplers read (the balanced SS sampler balances
(group, label) cells; its cell count is ``num_labels``, not ``num_classes``). Targets:

- segmentation: ``masks`` uint8 (H, W) per image, values ``0..num_classes-1`` (background
  counted: VOC has 21) and ``VOID = 255`` for pixels no loss or metric counts;
- detection: ``boxes`` float32 (K, 4) per image, ``(x1, y1, x2, y2)`` in continuous pixel
  coordinates of that image (pixel j covers [j, j+1), so a box of 1-based inclusive corners
  (a, b) is (a - 1, b)), ``box_labels`` int64 (K,) in ``1..num_classes`` (the foreground
  classes; the model's score 0 is background) and ``difficult`` bool (K,).

Images are one uint8 tensor (N, C, H, W) when all have one size (the embedded sets, which the
batch pipeline then keeps on the training device), else a list of uint8 (C, H_i, W_i) tensors
on the CPU (real data sets); masks follow the images' layout.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import DataError
from .split import check_val_fraction, holdout_index

TASKS = ("segmentation", "detection")
VOID = 255
"""Mask value of pixels that are ignored (VOC's object borders and ambiguous pixels)."""


def builds(task: str):
    """Decorator marking a data-set builder as one that builds ``task`` data ("segmentation" or
    "detection"), so that the task of a config is known before any data is read."""
    if task not in TASKS:
        raise ValueError(f"unknown dense task {task!r}; expected one of {', '.join(TASKS)}")

    def mark(builder):
        builder.task = task
        return builder

    return mark


def _as_long(values, n: int, what: str, name: str) -> torch.Tensor:
    out = torch.as_tensor(values, dtype=torch.long).reshape(-1)
    if out.numel() != n:
        raise DataError(f"{name}: {n} images but {out.numel()} {what}")
    return out


def _check_range(values: torch.Tensor, count: int, what: str, name: str) -> None:
    if values.numel() and (values.min() < 0 or values.max() >= count):
        bad = values[(values < 0) | (values >= count)][0].item()
        raise DataError(f"{name}: {what} {bad} is outside the valid range 0..{count - 1}")


class DenseDataset:
    """Images with a dense target per image (module docstring), groups and image-level labels.

    ``task``: "segmentation" or "detection". ``num_classes``: segmentation classes including
    background, or detection foreground classes. ``groups`` (N,) in ``0..num_groups-1`` (all 0
    without a sensitive attribute). ``labels`` (N,) image-level labels for the samplers, in
    ``0..num_labels-1`` (zeros when None; ``num_labels`` defaults to ``max(labels) + 1``).
    ``ids``: one unique string per image (default ``"0", "1", ...``). ``mean``/``std``: the
    per-channel normalisation applied after scaling to [0, 1], None for none.

    ``resample``: optional ``resample(epoch) -> DenseDataset`` giving the training images of an
    epoch (same length, groups and labels, fresh content), so a generated data set can re-draw
    its images every epoch; the batch pipeline asks :meth:`for_epoch` each epoch.
    """

    def __init__(
        self, images, groups, num_classes: int, num_groups: int, *, task: str, name: str,
        masks=None, boxes=None, box_labels=None, difficult=None, labels=None,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None, group_names: Sequence[str] | None = None,
        ids: Sequence[str] | None = None, num_labels: int | None = None,
        resample: Callable[[int], "DenseDataset"] | None = None,
    ):
        if task not in TASKS:
            raise DataError(f"{name}: task must be one of {', '.join(TASKS)}, got {task!r}")
        self.task, self.name = task, name
        self.images = self._check_images(images)
        n = len(self.images)
        self.ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        if len(self.ids) != n or len(set(self.ids)) != n:
            raise DataError(f"{name}: ids must be {n} unique strings, got {len(self.ids)} ({len(set(self.ids))} distinct)")
        self.num_classes, self.num_groups = int(num_classes), int(num_groups)
        if self.num_classes < 1 or self.num_groups < 1:
            raise DataError(f"{name}: num_classes and num_groups must be >= 1, got {num_classes} and {num_groups}")
        self.groups = _as_long(groups, n, "groups", name)
        _check_range(self.groups, self.num_groups, "group", name)
        self.labels = torch.zeros(n, dtype=torch.long) if labels is None else _as_long(labels, n, "labels", name)
        if num_labels is None:
            num_labels = int(self.labels.max()) + 1 if n else 1
        self.num_labels = int(num_labels)
        _check_range(self.labels, self.num_labels, "image-level label", name)
        self.masks = self.boxes = self.box_labels = self.difficult = None
        if task == "segmentation":
            if boxes is not None or box_labels is not None:
                raise DataError(f"{name}: a segmentation data set takes masks, not boxes")
            self.masks = self._check_masks(masks)
        else:
            if masks is not None:
                raise DataError(f"{name}: a detection data set takes boxes, not masks")
            self.boxes, self.box_labels, self.difficult = self._check_boxes(boxes, box_labels, difficult)
        channels = self.channels
        for what, v in (("mean", mean), ("std", std)):
            if v is not None and len(v) != channels:
                raise DataError(f"{name}: {what} has {len(v)} values for {channels}-channel images")
        if std is not None and min(std) <= 0:
            raise DataError(f"{name}: std must be positive, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None
        self.class_names = list(class_names) if class_names else [str(c) for c in range(self.num_classes)]
        self.group_names = list(group_names) if group_names else [str(g) for g in range(self.num_groups)]
        if len(self.class_names) != self.num_classes or len(self.group_names) != self.num_groups:
            raise DataError(f"{name}: {len(self.class_names)} class names for {self.num_classes} classes or "
                            f"{len(self.group_names)} group names for {self.num_groups} groups")
        self.resample = resample

    # ------------------------------------------------------------------ validation
    def _check_images(self, images):
        name = self.name
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise DataError(f"{name}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
            return images
        images = list(images)
        for i, im in enumerate(images):
            if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.dim() != 3:
                got = f"{im.dtype} {tuple(im.shape)}" if isinstance(im, torch.Tensor) else type(im).__name__
                raise DataError(f"{name}: image {i} must be a uint8 (C, H, W) tensor, got {got}")
            if im.shape[0] != images[0].shape[0]:
                raise DataError(f"{name}: image {i} has {im.shape[0]} channels, image 0 has {images[0].shape[0]}")
        return images

    def _check_masks(self, masks):
        name, n = self.name, len(self.images)
        if masks is None:
            raise DataError(f"{name}: a segmentation data set needs masks")
        if isinstance(self.images, torch.Tensor):
            want = (n, *self.images.shape[2:])
            if not isinstance(masks, torch.Tensor) or masks.dtype != torch.uint8 or tuple(masks.shape) != want:
                got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__
                raise DataError(f"{name}: masks must be uint8 {want} like the images, got {got}")
            self._check_mask_values(masks, "the masks")
            return masks
        masks = list(masks)
        if len(masks) != n:
            raise DataError(f"{name}: {n} images but {len(masks)} masks")
        for i, (m, im) in enumerate(zip(masks, self.images)):
            if not isinstance(m, torch.Tensor) or m.dtype != torch.uint8 or tuple(m.shape) != tuple(im.shape[1:]):
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
                raise DataError(f"{name}: mask of image {self._id(i)} must be uint8 {tuple(im.shape[1:])} "
                                f"like its image, got {got}")
            self._check_mask_values(m, f"the mask of image {self._id(i)}")
        return masks

    def _id(self, i: int) -> str:
        return repr(self.ids[i])

    def _check_mask_values(self, m: torch.Tensor, where: str) -> None:
        bad = (m >= self.num_classes) & (m != VOID)
        if bad.any():
            raise DataError(f"{self.name}: {where} holds value {int(m[bad][0])}; expected class indices "
                            f"0..{self.num_classes - 1} or {VOID} (void)")

    def _check_boxes(self, boxes, box_labels, difficult):
        name, n = self.name, len(self.images)
        if boxes is None or box_labels is None:
            raise DataError(f"{name}: a detection data set needs boxes and box_labels")
        boxes = [torch.as_tensor(b, dtype=torch.float32) for b in boxes]
        box_labels = [torch.as_tensor(b, dtype=torch.long) for b in box_labels]
        if difficult is None:
            difficult = [torch.zeros(b.shape[0] if b.dim() else 0, dtype=torch.bool) for b in boxes]
        difficult = [torch.as_tensor(d, dtype=torch.bool) for d in difficult]
        if not len(boxes) == len(box_labels) == len(difficult) == n:
            raise DataError(f"{name}: {n} images but {len(boxes)} box lists, {len(box_labels)} label lists "
                            f"and {len(difficult)} difficult lists")
        for i, (b, y, d) in enumerate(zip(boxes, box_labels, difficult)):
            if b.numel() == 0:
                boxes[i] = b = b.reshape(0, 4)
            if b.dim() != 2 or b.shape[1] != 4 or y.shape != (b.shape[0],) or d.shape != (b.shape[0],):
                raise DataError(f"{name}: image {self._id(i)} has boxes {tuple(b.shape)}, labels {tuple(y.shape)} and "
                                f"difficult {tuple(d.shape)}; expected (K, 4), (K,) and (K,)")
        if n:
            allb, ally = torch.cat(boxes), torch.cat(box_labels)
            owner = torch.repeat_interleave(torch.tensor([b.shape[0] for b in boxes]))
            bad = ~torch.isfinite(allb).all(1) | (allb[:, 2] <= allb[:, 0]) | (allb[:, 3] <= allb[:, 1])
            if bad.any():
                k = int(torch.nonzero(bad)[0])
                raise DataError(f"{name}: image {self._id(int(owner[k]))} has box {allb[k].tolist()}; expected finite "
                                f"(x1, y1, x2, y2) with x2 > x1 and y2 > y1")
            bad = (ally < 1) | (ally > self.num_classes)
            if bad.any():
                k = int(torch.nonzero(bad)[0])
                raise DataError(f"{name}: image {self._id(int(owner[k]))} has box label {int(ally[k])}; expected "
                                f"1..{self.num_classes} (0 is the background score)")
        return boxes, box_labels, difficult

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.images)

    @property
    def same_size(self) -> bool:
        """True when the images are one (N, C, H, W) tensor."""
        return isinstance(self.images, torch.Tensor)

    @property
    def channels(self) -> int:
        if self.same_size:
            return int(self.images.shape[1])
        return int(self.images[0].shape[0]) if self.images else 3

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of every image, or None when the sizes differ."""
        return tuple(self.images.shape[1:]) if self.same_size else None

    def target(self, i: int):
        """Image ``i``'s target: its mask, or ``{"boxes", "labels", "difficult"}``."""
        if self.task == "segmentation":
            return self.masks[i]
        return {"boxes": self.boxes[i], "labels": self.box_labels[i], "difficult": self.difficult[i]}

    def __getitem__(self, i: int):
        return self.images[i], self.target(i), int(self.groups[i])

    def cell_counts(self) -> torch.Tensor:
        """Images per (group, image-level label): a (num_groups, num_labels) int64 tensor."""
        cells = self.groups * self.num_labels + self.labels
        return torch.bincount(cells, minlength=self.num_groups * self.num_labels).view(self.num_groups, self.num_labels)

    def subset(self, index, name: str | None = None) -> "DenseDataset":
        """The images at positions ``index`` (a 1-D integer tensor or sequence), in that order."""
        pos = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        rows = pos.tolist()

        def take(items):
            if items is None:
                return None
            return items[pos] if isinstance(items, torch.Tensor) else [items[i] for i in rows]

        parent = self.resample
        resample = None if parent is None else (lambda epoch: parent(epoch).subset(pos))
        return DenseDataset(
            take(self.images), self.groups[pos], self.num_classes, self.num_groups, task=self.task,
            name=name or self.name, masks=take(self.masks), boxes=take(self.boxes),
            box_labels=take(self.box_labels), difficult=take(self.difficult), labels=self.labels[pos],
            mean=self.mean, std=self.std, class_names=self.class_names, group_names=self.group_names,
            ids=[self.ids[i] for i in rows], num_labels=self.num_labels, resample=resample,
        )

    def for_epoch(self, epoch: int) -> "DenseDataset":
        """The data set to train on in ``epoch``: itself, or ``resample(epoch)`` when set."""
        if self.resample is None:
            return self
        fresh = self.resample(int(epoch))
        if (len(fresh) != len(self) or not torch.equal(fresh.groups, self.groups)
                or not torch.equal(fresh.labels, self.labels) or fresh.task != self.task):
            raise DataError(f"{self.name}: resample({epoch}) changed the length, groups, labels or task")
        return fresh


def select_dense_split(full_train: DenseDataset, split: str, val_fraction: float) -> DenseDataset:
    """The "train" or "val" part of a dense training set: ``data/split.py``'s stratified hold-out
    over (group, image-level label) cells (all of it for "train" when ``val_fraction == 0``)."""
    check_val_fraction(full_train.name, split, val_fraction)
    if split not in ("train", "val"):
        raise ValueError(f"select_dense_split handles 'train' and 'val', got {split!r}")
    if not val_fraction:
        return full_train
    train, val = holdout_index(full_train.labels, full_train.groups, full_train.num_labels, val_fraction)
    return full_train.subset(train if split == "train" else val)
