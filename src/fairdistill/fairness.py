"""Group fairness of a classifier (kept import path): see ``fairdistill.metrics.fairness``.

``cell_counts``, ``metrics_from_counts`` and ``group_metrics`` keep their signatures; the
streaming (G, C, C) form is ``classification_counts`` + ``classification_metrics_from_counts``.
"""
from __future__ import annotations

from .metrics.fairness import (cell_counts, classification_counts, classification_metrics_from_counts, group_metrics,
                               metrics_from_counts)

__all__ = ["cell_counts", "classification_counts", "classification_metrics_from_counts", "group_metrics",
           "metrics_from_counts"]
