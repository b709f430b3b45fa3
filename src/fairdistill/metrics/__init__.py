"""Task metrics with group fairness: classification, semantic segmentation, detection.

- ``fairness``: per-group confusion counts (G, C, C) -> accuracy, DEO, DP, equalized odds, worst group.
- ``segmentation``: per-group pixel confusion (G, C, C) -> mIoU, IoU and recall gaps.
- ``detection``: VOC AP (07 11-point or area), per-group AP and recall-based DEO.
- ``coco``: COCO mAP through the optional ``faster-coco-eval`` (imported when called).

Counts of classification and segmentation add up over batches and processes; detection needs the
per-image lists gathered (``detection`` module docstring).
"""
from __future__ import annotations

from .coco import coco_map
from .detection import average_precision, detection_fairness, voc_ap
from .fairness import (cell_counts, classification_counts, classification_metrics_from_counts, group_metrics,
                       metrics_from_counts)
from .segmentation import segmentation_counts, segmentation_metrics, segmentation_metrics_from_counts

__all__ = [
    "average_precision", "cell_counts", "classification_counts", "classification_metrics_from_counts", "coco_map",
    "detection_fairness", "group_metrics", "metrics_from_counts", "segmentation_counts", "segmentation_metrics",
    "segmentation_metrics_from_counts", "voc_ap",
]
