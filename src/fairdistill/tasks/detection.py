"""Object detection: SSD's MultiBox loss; VOC AP with per-group AP and recall gaps."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as torch_dist

from ..data.dense_augment import parse_augment
from ..data.ssd_augment import SSDAugmentation
from ..distributed import DistContext
from ..errors import ConfigError
from ..metrics import coco_map, detection_fairness
from ..registry import Range
from .base import TASKS, Evaluator, Task
from .segmentation import dense_loader

from typing import Annotated


def image_size(model) -> int:
    """The square input side a detection model expects (``model.image_size``)."""
    size = getattr(model, "image_size", None)
    if size is None:
        raise ConfigError(f"{type(model).__name__}: a detection model must have an image_size attribute (its input side)")
    return int(size)


def normalised(targets: list[dict], size: int) -> list[dict]:
    """Boxes in pixels of a ``size`` x ``size`` batch -> xyxy in [0, 1], as the MultiBox loss takes."""
    return [{"boxes": t["boxes"] / size, "labels": t["labels"]} for t in targets]


class DetectionEvaluator(Evaluator):
    """Keeps every image's detections and ground truths (on the CPU) and its group; under
    torchrun they are gathered from every process before the VOC AP is computed (AP is not a
    sum of per-process counts)."""

    def __init__(self, model, task: "Detection", num_classes: int, num_groups: int, device):
        self.model, self.task, self.num_classes, self.num_groups = model, task, num_classes, num_groups
        self.size = image_size(model)
        self.detections, self.truths, self.groups = [], [], []
        self.loss_sum, self.count = 0.0, 0

    def update(self, outputs, target, g) -> None:
        if not target:
            return
        parts = self.model.loss(outputs, normalised(target, self.size))
        self.loss_sum += float(sum(parts)) * len(target)
        self.count += len(target)
        t = self.task
        for det, truth in zip(self.model.detect(outputs, score_threshold=t.score_threshold, nms_threshold=t.nms_threshold,
                                                top_k=t.top_k), target):
            self.detections.append({"boxes": det["boxes"].float().cpu() * self.size, "scores": det["scores"].float().cpu(),
                                    "labels": det["labels"].cpu()})
            self.truths.append({k: v.cpu() for k, v in truth.items()})
        self.groups.append(g.cpu())

    def result(self, dist: DistContext) -> dict:
        dets, truths = self.detections, self.truths
        groups = torch.cat(self.groups) if self.groups else torch.zeros(0, dtype=torch.long)
        loss_sum, count = self.loss_sum, self.count
        if dist.enabled:
            gathered = [None] * dist.world_size
            torch_dist.all_gather_object(gathered, (dets, truths, groups, loss_sum, count))
            dets = [d for part in gathered for d in part[0]]
            truths = [t for part in gathered for t in part[1]]
            groups = torch.cat([part[2] for part in gathered])
            loss_sum, count = sum(p[3] for p in gathered), sum(p[4] for p in gathered)
        out = detection_fairness(dets, truths, groups, self.num_classes, self.num_groups,
                                 score_threshold=self.task.recall_score)
        if self.task.coco:
            out["coco"] = coco_map(dets, truths, self.num_classes)
        out["loss"] = loss_sum / max(count, 1)
        return out


@TASKS.register("detection")
class Detection(Task):
    """Boxes and labels per image (labels 1..C; the model's class 0 is background).

    The model (SSD, ``models/ssd.py``) returns (loc, conf) and has ``priors``, ``image_size``,
    ``loss`` (MultiBox: smooth-L1 + 3:1 hard-negative CE, each divided by the positives) and
    ``detect`` (per-class NMS). Evaluation: VOC AP (07 11-point) pooled and per group (each
    group's images only), AP gaps, and the DEO family on per-(group, class) recall at IoU 0.5
    and score ``recall_score`` (``metrics/detection.py``). Batches come from ``data.augment``:
    ``size`` (the model's input side), ``flip``, ``antialias`` and ``ssd`` (the SSD300 training
    augmentation's switches, ``data/ssd_augment.py``; absent: none).

    Options (``task:``): ``score_threshold`` (0.01), ``nms_threshold`` (0.45), ``top_k`` (200) of
    the decoding; ``recall_score`` (0.5): the score from which a detection counts for recall;
    ``coco``: also COCO mAP through the optional faster-coco-eval.
    """

    headline = "map"
    final_keys = ("map", "map_by_group", "map_gap", "ap_gap_a", "ap_gap_m", "deo_a", "deo_m", "loss")
    details = ("ap", "ap_by_group", "recall_by_group", "cell_count", "excluded_cells", "coco")

    def __init__(self, score_threshold: Annotated[float, Range(ge=0, lt=1)] = 0.01,
                 nms_threshold: Annotated[float, Range(gt=0, le=1)] = 0.45, top_k: Annotated[int, Range(ge=1)] = 200,
                 recall_score: Annotated[float, Range(ge=0, le=1)] = 0.5, coco: bool = False):
        self.score_threshold, self.nms_threshold, self.top_k = score_threshold, nms_threshold, top_k
        self.recall_score, self.coco = recall_score, coco

    def loader(self, dataset, batch_size, *, train, cfg, device, seed, rank, world_size):
        settings = dict(cfg.data.augment)
        ssd = settings.pop("ssd", None)
        augment = parse_augment(settings, "detection", "data.augment")
        if ssd is not None and train:
            if not isinstance(ssd, dict):
                raise ConfigError(f"data.augment.ssd: expected a mapping of the SSD augmentation's switches, got {ssd!r}")
            if augment.size is None:
                raise ConfigError("data.augment.size: the SSD augmentation needs the model's input side (e.g. 300)")
            fill = tuple(255 * m for m in dataset.mean) if dataset.mean is not None else (127.5,) * dataset.channels
            try:
                hook = SSDAugmentation(augment.size, fill, flip=False, **ssd).hook
            except TypeError as e:
                raise ConfigError(f"data.augment.ssd: {e}") from None
            augment = dataclasses.replace(augment, transform=hook)
        return dense_loader(dataset, batch_size, train=train, cfg=cfg, device=device, seed=seed, rank=rank,
                            world_size=world_size, augment=augment)

    def loss(self, outputs, target, model):
        loc, conf = model.loss(outputs, normalised(target, image_size(model)))
        return {"loc": loc, "conf": conf}

    def evaluator(self, model, num_classes, num_groups, device):
        return DetectionEvaluator(model, self, num_classes, num_groups, device)

    @classmethod
    def summary(cls, metrics: dict) -> str:
        """One line (x100): mAP, each group's mAP, the AP gaps between groups (mean / max over
        classes), the recall DEO_A / DEO_M and the loss."""
        def pct(v):
            return "n/a" if v is None or v != v else f"{100 * v:.2f}"

        groups = " / ".join(pct(v) for v in metrics.get("map_by_group") or [])
        return (f"mAP {pct(metrics.get('map'))} (by group {groups or 'n/a'})  AP gap A {pct(metrics.get('ap_gap_a'))} "
                f"M {pct(metrics.get('ap_gap_m'))}  DEO_A {pct(metrics.get('deo_a'))}  DEO_M {pct(metrics.get('deo_m'))}  "
                f"loss {metrics['loss']:.4f}")
